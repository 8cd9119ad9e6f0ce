"""The DeepSpeed JSON for ``train.engine=deepspeed``: one source of truth shared with the trainer config.

Why a separate step: a ds_config already carries settings the trainer config also has (the "ds_soo"
block, the optimizer, clipping, batch sizes). Silently letting either side win would train something
other than what one of the two files says, so the rules are explicit:

* the "ds_soo" block, when present, *is* the preconditioner config (as for ``attach()`` in a user
  script): it replaces ``precond`` and ``optim.name`` follows its ``method``;
* an "optimizer" section means DeepSpeed builds the optimizer; ``optim.lr`` then follows its lr so
  damping and logs see the real value (its "auto" params take the trainer's lr, betas, eps, ...);
* ``gradient_clipping``: a number in the ds_config wins; "auto" or absent is filled from
  ``optim.grad_clip`` (never DeepSpeed's silent 1.0 default). It bounds the raw averaged gradient:
  ``attach()`` moves it into the preconditioner, which clips before preconditioning, and switches
  DeepSpeed's clipping of the preconditioned direction off;
* ``train_batch_size`` / ``train_micro_batch_size_per_gpu`` / ``gradient_accumulation_steps`` are
  derived from ``train.batch_size`` (global), ``train.grad_accum`` and the world size; a value already
  in the file must agree, else the error names both fields.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from ds_soo.config import ConfigError
from ds_soo.trainer.config import FIRST_ORDER, SECOND_ORDER, TrainConfig, build_config

BLOCK = "ds_soo"
AUTO = "auto"
BATCH_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read the JSON; a parse error names the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.ds_config: cannot read {p}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"train.ds_config: {p} must hold a JSON object")
    return data


def merge_into_trainer(cfg: TrainConfig, ds: dict[str, Any], log: logging.Logger | None = None) -> TrainConfig:
    """A new, re-validated TrainConfig with the ds_config's block, optimizer lr and clipping applied."""
    raw = cfg.to_dict()
    block = ds.get(BLOCK)
    if block is not None:
        if not isinstance(block, dict):
            raise ConfigError(f"{BLOCK} in the DeepSpeed config must be an object, got {type(block).__name__}")
        block = copy.deepcopy(block)
        method = block.pop("method", "kfac")
        if raw["precond"] and log is not None:
            log.info("ds_config has a %r block: it replaces the trainer's precond section", BLOCK)
        raw["precond"] = block
        if method in SECOND_ORDER:
            raw["optim"]["name"] = method
        elif method == "none":
            name = raw["optim"]["name"]
            raw["optim"]["name"] = name if name in FIRST_ORDER else (raw["optim"]["base"] or "sgd")
            raw["optim"]["base"] = None
        else:
            raise ConfigError(f"{BLOCK}.method must be one of {[*SECOND_ORDER, 'none']}, got {method!r}")
    section = ds.get("optimizer")
    if isinstance(section, dict):
        lr = (section.get("params") or {}).get("lr")
        if isinstance(lr, int | float) and not isinstance(lr, bool):
            raw["optim"]["lr"] = float(lr)
    clip = ds.get("gradient_clipping", AUTO)
    if clip != AUTO:
        if isinstance(clip, bool) or not isinstance(clip, int | float):
            raise ConfigError(f"gradient_clipping in the DeepSpeed config must be a number or 'auto', got {clip!r}")
        if float(clip) != raw["optim"]["grad_clip"] and log is not None:
            log.info("gradient_clipping=%g from the DeepSpeed config replaces optim.grad_clip=%g",
                     clip, raw["optim"]["grad_clip"])  # fmt: skip
        raw["optim"]["grad_clip"] = float(clip)
    return build_config(raw)


def finalize(cfg: TrainConfig, ds: dict[str, Any], world_size: int, precond: dict[str, Any]) -> dict[str, Any]:
    """The dict handed to ``deepspeed.initialize``: batch fields, clipping and the resolved ds_soo block."""
    t = cfg.train
    out = copy.deepcopy(ds)
    per_step = t.batch_size // t.grad_accum
    if t.batch_size % (t.grad_accum * world_size):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum}) x "
            f"world size ({world_size}): every rank gets an equal part of every micro-batch"
        )
    want = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": per_step // world_size,
        "gradient_accumulation_steps": t.grad_accum,
    }
    source = {
        "train_batch_size": "train.batch_size",
        "train_micro_batch_size_per_gpu": f"train.batch_size / (train.grad_accum x world size {world_size})",
        "gradient_accumulation_steps": "train.grad_accum",
    }
    for key in BATCH_FIELDS:
        have = out.get(key, AUTO)
        if have != AUTO and have != want[key]:
            raise ConfigError(
                f"{key}={have!r} in the DeepSpeed config disagrees with {source[key]} = {want[key]}; "
                f'set it to {want[key]} or "auto"'
            )
        out[key] = want[key]
    out["gradient_clipping"] = cfg.optim.grad_clip
    section = out.get("optimizer")
    if isinstance(section, dict):
        # HF-style "auto" optimizer params take the trainer's values.
        o = cfg.optim
        trainer_values = {"lr": o.lr, "weight_decay": o.weight_decay, "betas": list(o.betas), "eps": o.eps,
                          "momentum": o.momentum}  # fmt: skip
        params = section.setdefault("params", {})
        for key, value in params.items():
            if value == AUTO and key in trainer_values:
                params[key] = trainer_values[key]
    if "optimizer" not in out:
        # The trainer's own torch optimizer (SGD/AdamW) under ZeRO: DeepSpeed calls it "untested".
        out.setdefault("zero_allow_untested_optimizer", True)
    if precond.get("method", "none") != "none":
        out[BLOCK] = precond
    else:
        out.pop(BLOCK, None)
    # DeepSpeed's own scheduler section would step the lr a second time; the trainer owns the schedule.
    if "scheduler" in out:
        raise ConfigError(
            "the DeepSpeed config has a 'scheduler' section; remove it and set optim.schedule / "
            "optim.warmup_steps instead (the trainer steps the learning-rate schedule)"
        )
    return out
