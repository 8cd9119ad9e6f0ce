"""What a config means once the base optimizer is known: one config gives one update on every entry point.

``kfac.kl_clip: auto`` and the lr that the damping rule and the KL-clip use both depend on the optimizer
that applies the preconditioned gradient. The preconditioner is told that optimizer at construction
(``optimizer=``), by ``for_engine`` (a DeepSpeed engine's own), or by ``set_base_optimizer`` (``attach``,
``SecondOrderOptimizer``, the trainers). Whatever still depends on an optimizer that nobody named is
refused with a message naming the field, rather than guessed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ds_soo.config import ConfigError, PreconditionerConfig

KAISA_KL_CLIP = 1e-3
# A config's damping.lr and the optimizer's lr agree when within this relative distance.
LR_MATCH_RTOL = 1e-9


@dataclass(frozen=True)
class EffectiveOptions:
    """The resolved options that decide the update, as ``describe()`` and the log state them."""

    method: str
    base_optimizer: str | None
    kl_clip: float | None
    kl_clip_reason: str
    lr_source: str
    damping: str

    def lines(self) -> list[str]:
        kl = "off" if self.kl_clip is None else f"{self.kl_clip:g}"
        return [
            f"  base optimizer: {self.base_optimizer or 'not given'}",
            f"  K-FAC KL-clip: {kl} ({self.kl_clip_reason})",
            f"  lr for damping and KL-clip: {self.lr_source}",
            f"  damping: {self.damping}",
        ]


def innermost_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under wrappers (DeepSpeed's ZeRO optimizer, accelerate's, SecondOrderOptimizer)."""
    inner = optimizer
    seen: set[int] = set()
    while id(inner) not in seen:
        seen.add(id(inner))
        if isinstance(getattr(inner, "base", None), torch.optim.Optimizer):
            inner = inner.base
        elif getattr(inner, "optimizer", None) is not None:
            inner = inner.optimizer
        else:
            break
    return inner


def resolve_kl_clip(cfg: PreconditionerConfig, base: Any | None) -> tuple[float | None, str]:
    """The KL-clip bound in force and why. ``auto`` is KAISA's 0.001 over SGD and off over anything else."""
    if cfg.method != "kfac":
        return None, f"method is {cfg.method!r}"
    value = cfg.kfac.kl_clip
    if value is None:
        return None, "kfac.kl_clip: null"
    if value != "auto":
        return float(value), "kfac.kl_clip"
    if base is None:
        raise ConfigError(
            "kfac.kl_clip is 'auto', which means on (0.001) over an SGD base optimizer and off otherwise, but no "
            "base optimizer was given: pass optimizer= to Preconditioner(...) or Preconditioner.for_engine(...), "
            "call set_base_optimizer(opt), or set kfac.kl_clip to a number or null"
        )
    name = type(base).__name__
    if isinstance(base, torch.optim.SGD):
        return KAISA_KL_CLIP, f"auto: base optimizer is {name}"
    return None, f"auto: base optimizer is {name}, not SGD"


def _groups_holding(optimizer: Any, param_ids: Iterable[int]) -> list[dict]:
    """The param groups holding any of ``param_ids``; every group where none matches by identity."""
    groups = list(getattr(optimizer, "param_groups", None) or [])
    wanted = set(param_ids)
    return [g for g in groups if any(id(p) in wanted for p in g.get("params", []))] or groups


def optimizer_lr(optimizer: Any, param_ids: Iterable[int]) -> float:
    """The lr of the param groups that hold the preconditioned parameters.

    Groups are matched by parameter identity; where none matches (DeepSpeed's groups hold flat
    partitions), every group counts. One lr is needed: groups with different lrs are refused.
    """
    mine = _groups_holding(optimizer, param_ids)
    if not mine:
        raise ConfigError(f"the base optimizer {type(optimizer).__name__} has no param_groups to read the lr from")
    lrs = {float(g["lr"]) for g in mine}
    if len(lrs) > 1:
        raise ConfigError(
            f"the preconditioned parameters sit in param groups with different lrs {sorted(lrs)}; K-FAC's KL-clip "
            "and the scaled damping need one lr: use one lr for them, or set kfac.kl_clip: null and a constant damping"
        )
    return lrs.pop()


def initial_lr(optimizer: Any, param_ids: Iterable[int]) -> float:
    """The lr before any LR scheduler scaled it (schedulers keep it as ``initial_lr``)."""
    mine = _groups_holding(optimizer, param_ids)
    return float(mine[0].get("initial_lr", mine[0]["lr"])) if mine else float("nan")


def check_config_lr(config_lr: float | None, optimizer: Any, param_ids: Iterable[int]) -> None:
    """A ``damping.lr`` written in the config must be the optimizer's own lr (its initial lr under a scheduler)."""
    if config_lr is None:
        return
    ids = list(param_ids)
    candidates = {initial_lr(optimizer, ids), optimizer_lr(optimizer, ids)}
    if not any(abs(config_lr - c) <= LR_MATCH_RTOL * max(abs(c), 1e-30) for c in candidates):
        raise ConfigError(
            f"damping.lr={config_lr:g} disagrees with the base optimizer's lr {sorted(candidates)}: with an optimizer "
            "given, the lr is read from its param groups on every step; drop damping.lr or make them equal"
        )


def method_default_damping(cfg: PreconditionerConfig) -> float:
    """The damping a method uses where ``damping.value`` is unset."""
    return {"kfac": cfg.kfac.default_damping, "shampoo": cfg.shampoo.default_damping}.get(
        cfg.method, cfg.psgd.default_damping
    )


def describe_damping(cfg: PreconditionerConfig) -> str:
    d = cfg.damping
    base = method_default_damping(cfg) if d.value is None else d.value
    rel = " x each factor's mean eigenvalue (relative)" if d.relative else ""
    if d.kind == "constant":
        return f"constant {base:g}" + (" (the method's default)" if d.value is None else "") + rel
    if d.kind == "scaled":
        return (
            f"scaled {base:g} x (B/{d.ref_batch_size:g})^{d.batch_exponent:g} x (lr/{d.ref_lr:g})^{d.lr_exponent:g}"
            + rel
        )
    if d.kind == "adaptive":
        return (
            f"adaptive (Levenberg-Marquardt) from {base:g}{rel}: x{d.adapt_decay:g}^{d.adapt_interval} every "
            f"{d.adapt_interval} steps when the reduction ratio is above {d.adapt_high:g}, / below "
            f"{d.adapt_low:g}, within [{d.min_value:g}, {d.max_value:g}]"
        )
    return "callable fn(step, batch_size, lr)" + rel


def needs_lr(cfg: PreconditionerConfig, kl_clip: float | None) -> bool:
    return kl_clip is not None or cfg.damping.kind in ("scaled", "callable")
