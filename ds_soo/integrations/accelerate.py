"""accelerate: precondition at the gradient-sync boundary of an ``Accelerator`` training loop.

    accelerator = Accelerator(...)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    cfg = {"method": "kfac", "grad_clip": 1.0}   # clips the raw gradient, before preconditioning
    pre = ds_soo.integrations.accelerate.attach(accelerator, model, cfg, optimizer=optimizer)
    for batch in loader:                          # the loop is unchanged, minus clip_grad_norm_
        accelerator.backward(model(**batch).loss) # preconditions right after the boundary backward
        optimizer.step(); optimizer.zero_grad()

Clipping belongs to the raw gradient: ``grad_clip`` in the ds_soo config (or DeepSpeed's
``gradient_clipping``, which ``attach`` moves into the preconditioner). While attached,
``accelerator.clip_grad_norm_`` would clip the preconditioned direction instead, so it raises.
A step the preconditioner skips for non-finite gradients also skips ``optimizer.step()`` (pass
``optimizer=``), so weights and optimizer state stay exactly as they were.

Where the preconditioning happens, and why there:

- **DeepSpeed plugin.** ``accelerator.backward`` runs ``engine.backward`` *and* ``engine.step`` (the
  optimizer update); ``optimizer.step()`` in the loop is a no-op. So the only place between the
  averaged gradient and the update is ``engine.step``, which :func:`ds_soo.integrations.deepspeed.attach`
  wraps; it also moves ``gradient_clipping`` onto the raw gradient.
- **DDP, one process, FSDP2.** ``accelerator.backward`` is wrapped: after the backward of the
  micro-batch on which gradients are synchronised (``accelerator.sync_gradients``), the averaged
  gradients are clipped (``grad_clip``) and preconditioned in place; the optimizer step applies them.

FSDP1 is refused (its flat parameters have no per-layer gradient view). On CPU accelerate's FSDP
plugin does not engage at all (it runs DDP); FSDP2 users call ``fully_shard`` themselves and then
``Preconditioner.for_engine``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.integrations.deepspeed import BLOCK_KEY, validate_ds_config
from ds_soo.preconditioner import Preconditioner

ConfigLike = PreconditionerConfig | Mapping[str, Any] | None
log = logging.getLogger(__name__)


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
        """Tell the damping rule and K-FAC's KL-clip the learning rate the coming update will use."""
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
    if cfg.method == "kfac" and cfg.kfac.fisher == "mc":
        log.warning(
            "ds_soo: kfac.fisher is 'mc': call Preconditioner.mc_fisher_backward(logits, loss_scale=1/grad_accum) "
            "after each forward (SecondOrderTrainer does), else the first statistics step raises"
        )
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
    if optimizer is not None:
        pre.set_base_optimizer(optimizer)
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
    if optimizer is not None:
        pre.set_base_optimizer(optimizer)
    else:
        log.warning(
            "ds_soo: attach() without optimizer=: a step skipped for non-finite gradients only zeroes them, and "
            "an optimizer with momentum or Adam state would still move the weights; pass optimizer="
        )
    original_backward = accelerator.backward

    def backward(loss: torch.Tensor, **kwargs: Any) -> None:
        original_backward(loss, **kwargs)
        if accelerator.sync_gradients:  # the last micro-batch: gradients are now averaged over ranks
            binding.before_step()
            pre.step()
            if pre.last_step_skipped and optimizer is not None and pre.access.grad_scale() == 1.0:
                skip_next_step(optimizer)

    original_clip = accelerator.clip_grad_norm_

    def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any):
        if math.isinf(float(max_norm)):  # a norm for logging (the HF Trainer does this): no clipping
            return original_clip(parameters, max_norm, *args, **kwargs)
        raise ConfigError(
            "accelerator.clip_grad_norm_ after ds_soo's preconditioning would clip the preconditioned direction; "
            "set grad_clip in the ds_soo config instead (it clips the raw gradient before preconditioning)"
        )

    accelerator.backward = backward
    accelerator.clip_grad_norm_ = clip_grad_norm_

    def restore() -> None:
        if vars(accelerator).get("backward") is backward:
            del accelerator.backward  # back to Accelerator.backward
        if vars(accelerator).get("clip_grad_norm_") is clip_grad_norm_:
            del accelerator.clip_grad_norm_

    binding.restore.append(restore)
    return binding


def skip_next_step(optimizer: Any) -> None:
    """Make the next ``step()`` of ``optimizer``'s innermost torch optimizer a no-op, once.

    A step the preconditioner skipped for non-finite gradients has zeroed them; stepping an optimizer
    with momentum or Adam state on zeros would still move the weights and its state.
    """
    inner = innermost_optimizer(optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise RuntimeError(f"ds_soo: cannot skip a step of {type(optimizer).__name__}: no torch optimizer inside")

    def step(*_args: Any, **_kwargs: Any) -> None:
        vars(inner).pop("step", None)  # once: the next call is the class's step again
        return None

    inner.step = step


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
    "skip_next_step",
]  # fmt: skip
