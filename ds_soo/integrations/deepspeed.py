"""DeepSpeed: turn preconditioning on for an engine with one call after ``deepspeed.initialize``.

    engine, optimizer, _, _ = deepspeed.initialize(model=model, config="ds_config.json", ...)
    pre = ds_soo.integrations.deepspeed.attach(engine)   # reads the config's "ds_soo" block
    for batch in loader:                                  # the loop is unchanged
        engine.backward(engine(batch).loss)
        engine.step()

``attach`` wraps ``engine.step`` so that, at each gradient-accumulation boundary, the engine's
averaged gradients are preconditioned in place before its own optimizer (with its loss scaling,
clipping and offload) applies the update. Micro-steps that are not a boundary pass straight through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.preconditioner import Preconditioner

BLOCK_KEY = "ds_soo"


def validate_ds_config(ds_config: Mapping[str, Any]) -> PreconditionerConfig:
    """Validate the "ds_soo" block and the DeepSpeed settings it would be silently wrong under."""
    if BLOCK_KEY not in ds_config:
        raise ConfigError(
            f"the DeepSpeed config has no {BLOCK_KEY!r} block; add one, e.g. " + '{"ds_soo": {"method": "kfac"}}'
        )
    cfg = PreconditionerConfig.from_dict(ds_config[BLOCK_KEY], prefix=BLOCK_KEY)
    if "gradient_clipping" not in ds_config:
        raise ConfigError(
            "gradient_clipping must be set explicitly when ds_soo is used: DeepSpeed 0.19 defaults to 1.0, "
            "which rescales the preconditioned gradient; use 0.0 to disable or the value you mean"
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
    original_step = engine.step

    def step(*args: Any, **kwargs: Any):
        if engine.is_gradient_accumulation_boundary():
            # The damping rule may scale with the global batch and the (scheduled) learning rate.
            pre.set_hyperparams(batch_size=engine.train_batch_size(), lr=_current_lr(engine))
            pre.step()
        return original_step(*args, **kwargs)

    engine.step = step
    engine.ds_soo = pre
    return pre


def _current_lr(engine: Any) -> float | None:
    try:
        lrs = engine.get_lr()
    except Exception:  # noqa: BLE001 - no optimizer or scheduler yet: leave the damping's lr alone
        return None
    return float(lrs[0]) if lrs else None
