"""Base optimizer, learning-rate schedule and (for kfac/shampoo/psgd) the preconditioner."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ds_soo.trainer.config import SECOND_ORDER, OptimConfig, TrainConfig, precond_dict


def base_name(cfg: OptimConfig) -> str:
    """The torch optimizer that applies the update: adamw/sgd as named, else ``optim.base`` (sgd)."""
    if cfg.name in SECOND_ORDER:
        return cfg.base or "sgd"
    return cfg.name


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only: decaying LayerNorm gains and biases just fights the normalization."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if base_name(cfg) == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def resolved_precond(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> dict[str, Any]:
    """The precond dict with run-dependent values filled in where the user left them unset."""
    d = precond_dict(cfg)
    sched = d.setdefault("schedule", {})
    sched.setdefault("total_steps", total_steps)
    sched.setdefault("steps_per_epoch", steps_per_epoch)
    damping = d.setdefault("damping", {})
    damping.setdefault("batch_size", float(cfg.train.batch_size))
    damping.setdefault("lr", float(cfg.optim.lr))
    return d


def build_preconditioner(wrapped: Any, precond: dict[str, Any]):
    """A ``ds_soo.Preconditioner`` for second-order methods, None for first-order ones.

    ``wrapped`` is what the engine runs: a plain module, DDP, an FSDP2 module or a DeepSpeed engine.
    The engine adapter (``Preconditioner.for_engine``) shards curvature blocks over the ranks and knows
    where each rank's gradient pieces live; a DeepSpeed engine gets ``attach()``, which preconditions
    inside ``engine.step()`` at each accumulation boundary.
    """
    if precond.get("method", "none") == "none":
        return None
    if hasattr(wrapped, "zero_optimization_stage"):  # a DeepSpeed engine
        from ds_soo.integrations.deepspeed import attach

        return attach(wrapped, precond)
    from ds_soo import Preconditioner

    return Preconditioner.for_engine(wrapped, precond)
