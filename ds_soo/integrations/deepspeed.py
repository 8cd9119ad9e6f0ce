"""DeepSpeed: turn preconditioning on for an engine with one call after ``deepspeed.initialize``.

    engine, optimizer, _, _ = deepspeed.initialize(model=model, config="ds_config.json", ...)
    pre = ds_soo.integrations.deepspeed.attach(engine)   # reads the config's "ds_soo" block
    for batch in loader:                                  # the loop is unchanged
        engine.backward(engine(batch).loss)
        engine.step()

``attach`` wraps ``engine.step`` so that, at each gradient-accumulation boundary, the engine's
averaged gradients are preconditioned in place before its own optimizer (with its loss scaling and
offload) applies the update. Micro-steps that are not a boundary pass straight through.

- **Clipping.** The config's ``gradient_clipping`` moves into the preconditioner, which clips the raw
  averaged gradient *before* preconditioning (as first-order training does); DeepSpeed's own clipping,
  which would act on the preconditioned direction, is switched off on the engine (its config value
  and the ZeRO/fp16 optimizer's ``clip_grad``, re-checked every step since a checkpoint load restores it).
- **Skipped steps.** When the preconditioner skips a step for non-finite gradients, the engine's
  ``step()`` still runs (so DeepSpeed's micro-step and boundary bookkeeping stay consistent) but with
  the base optimizer's ``step`` suppressed: weights and optimizer state (momentum, Adam moments, step
  counts) stay exactly as they were. Under fp16 loss scaling DeepSpeed's own overflow skip does this.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.preconditioner import Preconditioner

BLOCK_KEY = "ds_soo"
log = logging.getLogger(__name__)


def validate_ds_config(ds_config: Mapping[str, Any]) -> PreconditionerConfig:
    """Validate the "ds_soo" block and the DeepSpeed settings it would be silently wrong under."""
    if BLOCK_KEY not in ds_config:
        raise ConfigError(
            f"the DeepSpeed config has no {BLOCK_KEY!r} block; add one, e.g. " + '{"ds_soo": {"method": "kfac"}}'
        )
    cfg = PreconditionerConfig.from_dict(ds_config[BLOCK_KEY], prefix=BLOCK_KEY)
    if "gradient_clipping" not in ds_config:
        raise ConfigError(
            "gradient_clipping must be set explicitly when ds_soo is used: DeepSpeed 0.19 defaults to 1.0 "
            "silently; ds_soo applies it to the raw averaged gradient before preconditioning (DeepSpeed's own "
            "clipping of the preconditioned direction is switched off). Use 0.0 to disable or the norm you mean"
        )
    clip = ds_config["gradient_clipping"]
    if clip != "auto" and (isinstance(clip, bool) or not isinstance(clip, int | float) or clip < 0):
        raise ConfigError(f"gradient_clipping must be a number >= 0, got {clip!r}")
    if isinstance(clip, int | float) and clip > 0 and cfg.grad_clip > 0 and float(clip) != cfg.grad_clip:
        raise ConfigError(
            f"gradient_clipping={clip} and ds_soo.grad_clip={cfg.grad_clip:g} disagree; both clip the raw "
            "gradient before preconditioning, so set one of them (or the same value)"
        )
    zero = ds_config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    opt_type = str((ds_config.get("optimizer") or {}).get("type", "")).lower()
    if stage >= 1 and opt_type and opt_type not in ("adam", "adamw", "fusedadam", "cpuadam", "lamb") \
            and not ds_config.get("zero_allow_untested_optimizer", False):
        raise ConfigError(
            f"zero_allow_untested_optimizer must be true for optimizer.type={opt_type!r} under ZeRO stage {stage} "
            "(DeepSpeed refuses it otherwise)"
        )
    if cfg.method == "shampoo" and cfg.shampoo.grafting == "adam" and opt_type in ("adam", "adamw", "fusedadam"):
        raise ConfigError(
            "ds_soo.shampoo.grafting='adam' with optimizer.type Adam normalises the update twice; "
            "use optimizer.type SGD (momentum) with Adam grafting, or set ds_soo.shampoo.grafting to 'none'"
        )
    return cfg


def attach(engine: Any, config: PreconditionerConfig | Mapping[str, Any] | None = None) -> Preconditioner:
    """Precondition ``engine``'s gradients at every accumulation boundary; returns the Preconditioner.

    ``config`` defaults to the engine config's "ds_soo" block. Calling it twice is an error.
    """
    if getattr(engine, "ds_soo", None) is not None:
        raise RuntimeError("ds_soo is already attached to this engine")
    ds_config = dict(getattr(engine, "config", {}) or {})
    if config is None:
        cfg: PreconditionerConfig | Mapping[str, Any] = validate_ds_config(ds_config)
    else:
        cfg = config
    pre = Preconditioner.for_engine(engine, cfg)
    clip = float(engine.gradient_clipping() or 0.0) if hasattr(engine, "gradient_clipping") else 0.0
    pre.set_hyperparams(grad_clip=clip)  # raises if it disagrees with ds_soo.grad_clip
    _disable_engine_clipping(engine)
    if clip > 0:
        log.info("ds_soo: gradient_clipping=%g now clips the raw gradient before preconditioning", clip)
    basic = getattr(engine, "basic_optimizer", None)
    if basic is not None:
        pre.set_base_optimizer(basic)
    original_step = engine.step

    def step(*args: Any, **kwargs: Any):
        if not engine.is_gradient_accumulation_boundary():
            return original_step(*args, **kwargs)
        # The damping rule (and K-FAC's KL-clip) may scale with the global batch and the scheduled lr.
        pre.set_hyperparams(batch_size=engine.train_batch_size(), lr=_current_lr(engine))
        _disable_engine_clipping(engine)
        pre.step()
        if pre.last_step_skipped and pre.access.grad_scale() == 1.0:
            with _optimizer_step_suppressed(engine):
                return original_step(*args, **kwargs)
        return original_step(*args, **kwargs)

    engine.step = step
    engine.ds_soo = pre
    return pre


def _disable_engine_clipping(engine: Any) -> None:
    """Stop DeepSpeed clipping the preconditioned direction (ds_soo clipped the raw gradient already)."""
    config = getattr(engine, "_config", None)
    if config is not None and getattr(config, "gradient_clipping", 0.0):
        config.gradient_clipping = 0.0
    opt = getattr(engine, "optimizer", None)
    if opt is not None and getattr(opt, "clip_grad", 0.0):
        opt.clip_grad = 0.0


def _torch_optimizers(engine: Any) -> list[torch.optim.Optimizer]:
    """Every torch optimizer a DeepSpeed engine may step: the basic one, and ZeRO's wrapped/backup ones."""
    found: list[torch.optim.Optimizer] = []
    candidates = [getattr(engine, "basic_optimizer", None), getattr(engine, "optimizer", None)]
    wrapper = getattr(engine, "optimizer", None)
    candidates += [getattr(wrapper, "optimizer", None), getattr(wrapper, "backup_optimizer", None)]
    for opt in candidates:
        if isinstance(opt, torch.optim.Optimizer) and all(opt is not f for f in found):
            found.append(opt)
    return found


@contextlib.contextmanager
def _optimizer_step_suppressed(engine: Any) -> Iterator[None]:
    """Run ``engine.step()`` with every torch optimizer's ``step`` a no-op (a skipped non-finite step)."""
    opts = _torch_optimizers(engine)
    if not opts:
        raise RuntimeError("ds_soo: cannot find the DeepSpeed engine's torch optimizer to skip a non-finite step")
    for opt in opts:
        opt.step = _no_step  # instance attribute shadows the class's step for this call only
    try:
        yield
    finally:
        for opt in opts:
            vars(opt).pop("step", None)


def _no_step(*_args: Any, **_kwargs: Any) -> None:
    return None


def _current_lr(engine: Any) -> float | None:
    try:
        lrs = engine.get_lr()
    except Exception:  # noqa: BLE001 - no optimizer or scheduler yet: leave the damping's lr alone
        return None
    return float(lrs[0]) if lrs else None
