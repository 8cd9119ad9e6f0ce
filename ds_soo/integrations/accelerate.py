"""accelerate: precondition at the gradient-sync boundary of an ``Accelerator`` training loop.

    accelerator = Accelerator(...)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    pre = ds_soo.integrations.accelerate.attach(accelerator, model, {"method": "kfac"}, optimizer=optimizer)
    for batch in loader:                          # the loop is unchanged
        accelerator.backward(model(**batch).loss) # preconditions right after the boundary backward
        accelerator.clip_grad_norm_(model.parameters(), 1.0)   # clips the preconditioned gradient
        optimizer.step(); optimizer.zero_grad()

Where the preconditioning happens, and why there:

- **DeepSpeed plugin.** ``accelerator.backward`` runs ``engine.backward`` *and* ``engine.step`` (the
  optimizer update, with DeepSpeed's own clipping); ``optimizer.step()`` in the loop is a no-op. So the
  only place between the averaged gradient and the update is ``engine.step``, which
  :func:`ds_soo.integrations.deepspeed.attach` wraps. DeepSpeed's ``gradient_clipping`` then clips
  the preconditioned gradient.
- **DDP, one process, FSDP2.** ``accelerator.backward`` is wrapped: after the backward of the
  micro-batch on which gradients are synchronised (``accelerator.sync_gradients``), the averaged
  gradients are preconditioned in place. A ``clip_grad_norm_`` after it, and the optimizer step, see
  the preconditioned gradient, exactly as under DeepSpeed.

FSDP1 is refused (its flat parameters have no per-layer gradient view). On CPU accelerate's FSDP
plugin does not engage at all (it runs DDP); FSDP2 users call ``fully_shard`` themselves and then
``Preconditioner.for_engine``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.integrations.deepspeed import BLOCK_KEY, validate_ds_config
from ds_soo.preconditioner import Preconditioner

ConfigLike = PreconditionerConfig | Mapping[str, Any] | None


@dataclass
class Binding:
    """What :func:`attach` changed, so that :func:`detach` can undo exactly that."""

    pre: Preconditioner
    accelerator: Any
    engine: Any = None
    optimizer: Any = None
    auto_lr: bool = False
    restore: list[Callable[[], None]] = field(default_factory=list)

    def before_step(self) -> None:
        """Tell a ``scaled`` damping rule the learning rate the coming update will use."""
        if not self.auto_lr:
            return
        lr = _current_lr(self.optimizer, self.engine)
        if lr is not None:
            self.pre.set_hyperparams(lr=lr)


def deepspeed_config_of(accelerator: Any) -> dict[str, Any] | None:
    """The ds_config accelerate hands DeepSpeed (the Trainer's, with "auto" filled), or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    hf = getattr(plugin, "hf_ds_config", None)
    return dict(getattr(hf, "config", None) or plugin.deepspeed_config or {})


def resolve_config(config: ConfigLike, ds_config: Mapping[str, Any] | None) -> PreconditionerConfig:
    """The config to use: the explicit one, else the ds_config's "ds_soo" block; both must agree if both exist.

    Under DeepSpeed the clipping setting is checked too: 0.19 clips at 1.0 when the key is absent,
    which silently rescales the preconditioned gradient.
    """
    if ds_config is None:
        if config is None:
            raise ConfigError(
                "no ds_soo config: pass one (e.g. {'method': 'kfac'}), or use DeepSpeed with a 'ds_soo' block"
            )
        return PreconditionerConfig.from_dict(config)
    if BLOCK_KEY in ds_config:
        from_block = validate_ds_config(ds_config)
        if config is None:
            return from_block
        explicit = PreconditionerConfig.from_dict(config)
        if explicit.to_dict() != from_block.to_dict():
            raise ConfigError(
                "ds_soo config given twice and they differ: as an argument and as the DeepSpeed config's "
                f"{BLOCK_KEY!r} block; keep one"
            )
        return explicit
    if config is None:
        raise ConfigError(
            f"the DeepSpeed config has no {BLOCK_KEY!r} block and no ds_soo config was passed; add one, "
            'e.g. "ds_soo": {"method": "kfac"}'
        )
    if "gradient_clipping" not in ds_config:
        raise ConfigError(
            "gradient_clipping must be set explicitly in the DeepSpeed config when ds_soo is used: DeepSpeed 0.19 "
            "defaults to 1.0, which rescales the preconditioned gradient (with the HF Trainer, 'auto' follows "
            "max_grad_norm)"
        )
    return PreconditionerConfig.from_dict(config)


def innermost_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (each keeps it as ``.optimizer``)."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen and getattr(optimizer, "optimizer", None) is not None:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def check_base_optimizer(cfg: PreconditionerConfig, optimizer: Any) -> None:
    """Shampoo grafted onto Adam's step size, then applied by Adam, normalises the update twice."""
    if optimizer is None or cfg.method != "shampoo" or cfg.shampoo.grafting != "adam":
        return
    name = type(innermost_optimizer(optimizer)).__name__
    if "adam" in name.lower():
        raise ConfigError(
            f"ds_soo.shampoo.grafting='adam' with a {name} base optimizer normalises the update twice; "
            "use SGD (e.g. TrainingArguments(optim='sgd')) with Adam grafting, or set shampoo.grafting to 'none'"
        )


def _current_lr(optimizer: Any, engine: Any) -> float | None:
    groups = getattr(optimizer, "param_groups", None) if optimizer is not None else None
    if groups:
        return float(groups[0]["lr"])
    if engine is not None and hasattr(engine, "get_lr"):
        lrs = engine.get_lr()
        return float(lrs[0]) if lrs else None
    return None


def _is_engine(model: Any) -> bool:
    return type(model).__name__ == "DeepSpeedEngine" or hasattr(model, "zero_optimization_stage")


def attach(
    accelerator: Any,
    model: Any,
    config: ConfigLike = None,
    *,
    optimizer: Any = None,
    global_batch_size: int | None = None,
) -> Preconditioner:
    """Precondition ``model``'s averaged gradients once per optimizer step; returns the Preconditioner.

    ``model`` is what ``accelerator.prepare`` returned (a DeepSpeed engine, DDP, an FSDP2 module or
    the plain model). ``config`` defaults to the DeepSpeed config's "ds_soo" block. ``optimizer`` and
    ``global_batch_size`` feed a ``damping.kind: scaled`` rule and the Shampoo/Adam check.
    """
    cfg = resolve_config(config, deepspeed_config_of(accelerator))
    return attach_resolved(accelerator, model, cfg, optimizer=optimizer, global_batch_size=global_batch_size)


def attach_resolved(
    accelerator: Any,
    model: Any,
    cfg: PreconditionerConfig,
    *,
    optimizer: Any = None,
    global_batch_size: int | None = None,
) -> Preconditioner:
    """:func:`attach` with a config already resolved by :func:`resolve_config` (and possibly completed)."""
    if getattr(accelerator, "ds_soo", None) is not None:
        raise RuntimeError("ds_soo is already attached to this Accelerator; call detach() first")
    ds_config = deepspeed_config_of(accelerator)
    cfg = copy.deepcopy(cfg)
    check_base_optimizer(cfg, optimizer)
    auto_lr = cfg.damping.kind == "scaled" and cfg.damping.lr is None
    if ds_config is not None:
        if not _is_engine(model):
            raise TypeError(
                f"accelerate runs DeepSpeed but {type(model).__name__} is not its engine: pass the model "
                "that accelerator.prepare returned"
            )
        if cfg.damping.kind == "scaled" and cfg.damping.batch_size is None:
            cfg.damping.batch_size = float(global_batch_size or model.train_batch_size())
        binding = _attach_deepspeed(accelerator, model, cfg, optimizer, auto_lr)
    else:
        if cfg.damping.kind == "scaled" and cfg.damping.batch_size is None and global_batch_size:
            cfg.damping.batch_size = float(global_batch_size)
        binding = _attach_backward(accelerator, model, cfg, optimizer, auto_lr)
    accelerator.ds_soo = binding
    return binding.pre


def _attach_deepspeed(accelerator: Any, engine: Any, cfg: PreconditionerConfig, optimizer: Any, auto_lr: bool):
    from ds_soo.integrations.deepspeed import attach as ds_attach

    pre = ds_attach(engine, cfg)
    binding = Binding(pre, accelerator, engine=engine, optimizer=optimizer, auto_lr=auto_lr)
    preconditioning_step = engine.step  # attach's wrapper around the engine's own step

    def step(*args: Any, **kwargs: Any):
        if engine.is_gradient_accumulation_boundary():
            binding.before_step()
        return preconditioning_step(*args, **kwargs)

    engine.step = step

    def restore() -> None:
        if "step" in vars(engine):
            del engine.step  # back to DeepSpeedEngine.step
        engine.ds_soo = None

    binding.restore.append(restore)
    return binding


def _gradient_access(model: Any, accelerator: Any):
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - every supported torch has it
        FullyShardedDataParallel = ()  # noqa: N806
    if isinstance(model, FullyShardedDataParallel):
        raise ConfigError(
            "FSDP1 (FullyShardedDataParallel) is not supported: its flat parameters have no per-layer gradient; "
            "use FSDP2 (fsdp_version: 2, or torch's fully_shard)"
        )
    from ds_soo.distributed.engines.fsdp2 import is_fsdp2

    if is_fsdp2(model):
        from ds_soo.distributed.engines import access_for

        return access_for(model)
    from ds_soo.distributed.engines.ddp import DDPGradientAccess

    scaler = getattr(accelerator, "scaler", None)
    return DDPGradientAccess(model, scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None)


def _attach_backward(accelerator: Any, model: Any, cfg: PreconditionerConfig, optimizer: Any, auto_lr: bool):
    access = _gradient_access(model, accelerator)
    inner = getattr(model, "module", model)
    pre = Preconditioner(inner, cfg, access=access)
    binding = Binding(pre, accelerator, optimizer=optimizer, auto_lr=auto_lr)
    original_backward = accelerator.backward

    def backward(loss: torch.Tensor, **kwargs: Any) -> None:
        original_backward(loss, **kwargs)
        if accelerator.sync_gradients:  # the last micro-batch: gradients are now averaged over ranks
            binding.before_step()
            pre.step()

    accelerator.backward = backward

    def restore() -> None:
        if vars(accelerator).get("backward") is backward:
            del accelerator.backward  # back to Accelerator.backward

    binding.restore.append(restore)
    return binding


def detach(accelerator: Any) -> Preconditioner | None:
    """Undo :func:`attach`: restore ``backward``/``engine.step`` and remove the hooks; returns the Preconditioner.

    The Preconditioner keeps its counters and state, so it can still be inspected or saved.
    """
    binding: Binding | None = getattr(accelerator, "ds_soo", None)
    if binding is None:
        return None
    for undo in reversed(binding.restore):
        undo()
    binding.pre.remove_hooks()
    accelerator.ds_soo = None
    return binding.pre


__all__ = [
    "Binding", "attach", "attach_resolved", "check_base_optimizer", "deepspeed_config_of", "detach", "resolve_config",
]  # fmt: skip
