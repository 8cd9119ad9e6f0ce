"""Hugging Face ``transformers.Trainer``: fine-tune with K-FAC or Shampoo in one process, DDP or DeepSpeed.

    trainer = SecondOrderTrainer(model=model, args=args, train_dataset=ds, ds_soo={"method": "kfac"})
    trainer.train()
    trainer.preconditioner.counters      # proof that preconditioning ran

or, for a Trainer subclass you already have (SFTTrainer, ...): ``enable_second_order(trainer, cfg)``.

Where the preconditioning happens, and why there (transformers 5.x):

- The Trainer's step is ``backward`` on each micro-batch, then ``clip`` (``max_grad_norm``), then
  ``on_pre_optimizer_step``, then ``optimizer.step()``. Preconditioning runs right after the backward of
  the last micro-batch. ``max_grad_norm`` bounds the *raw* averaged gradient, as in first-order
  training: it becomes the preconditioner's ``grad_clip`` (applied before preconditioning) and the
  Trainer's own clip, which would act on the preconditioned direction, is off during ``train()``.
  Clipping a preconditioned (e.g. Adam-grafted Shampoo) direction would shrink it by orders of magnitude.
- Under ``deepspeed=`` the engine's update happens *inside* ``accelerator.backward`` (accelerate calls
  ``engine.step()`` there), before the Trainer's clip and ``on_pre_optimizer_step``, and the Trainer
  replaces any optimizer passed as ``optimizers=``. So a callback or a wrapped optimizer would silently
  do nothing; instead ``engine.step`` is wrapped (:func:`ds_soo.integrations.deepspeed.attach`), which
  moves DeepSpeed's ``gradient_clipping`` (``"auto"`` = ``max_grad_norm``) onto the raw gradient.
- A step skipped for non-finite gradients skips the optimizer's step too (weights and optimizer state
  unchanged); ``kfac.fisher: mc`` is fed from :meth:`SecondOrderTrainer.compute_loss`.
- ``damping.kind: adaptive``: each micro-batch's inputs and loss are kept for the step; after an
  adaptation step the callback evaluates the same loss again at the new weights (no gradient, no
  statistics) and reports both to the preconditioner, before any checkpoint is written.
- After every optimizer step the callback checks that exactly one preconditioning step ran and raises
  otherwise, so a custom ``training_step`` that bypasses ``accelerator.backward`` cannot lose it silently.

The preconditioner is created at ``on_train_begin``, after the model is wrapped (DDP, DeepSpeed engine,
FSDP2). The config defaults to the DeepSpeed config's ``"ds_soo"`` block; ``schedule.total_steps`` and
``schedule.steps_per_epoch`` default to the Trainer's. Each rank's curvature state is saved next to the
Trainer's checkpoints (``ds_soo_rank{r}.pt``) and restored on ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.integrations import accelerate as acc
from ds_soo.integrations.deepspeed import BLOCK_KEY
from ds_soo.optim import SecondOrderOptimizer
from ds_soo.preconditioner import Preconditioner

log = logging.getLogger(__name__)

STATE_FILE = "ds_soo_rank{rank}.pt"
ConfigLike = PreconditionerConfig | Mapping[str, Any] | None


def _trainer_ds_config(trainer: Trainer) -> dict[str, Any] | None:
    """The Trainer's DeepSpeed config (``TrainingArguments(deepspeed=...)``), or None."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    hf = getattr(trainer.args, "hf_deepspeed_config", None)
    if hf is not None:
        return dict(hf.config)
    return acc.deepspeed_config_of(trainer.accelerator)


@dataclass
class _Run:
    """Per-``train()`` bookkeeping: the preconditioner and where the step counts started."""

    pre: Preconditioner
    first_pre_step: int
    first_global_step: int


@dataclass(eq=False)
class SecondOrderCallback(TrainerCallback):
    """Creates the Preconditioner once the Trainer has wrapped the model; checks, saves and restores it.

    Made by :func:`enable_second_order`, which also hooks ``trainer.train`` to learn the resume path.
    """

    trainer: Trainer
    config: PreconditionerConfig | None
    preconditioner: Preconditioner | None = None
    resume_from: str | None = None
    _run: _Run | None = field(default=None, repr=False)
    _saved_max_grad_norm: float | None = field(default=None, repr=False)
    # damping.kind="adaptive": this step's micro-batches (model, inputs, loss kwargs, loss as computed,
    # loss as back-propagated), and the list compute_loss appends to while a training_step runs.
    _micros: list = field(default_factory=list, repr=False)
    _recording: list | None = field(default=None, repr=False)
    _compute_loss: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ lifecycle
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        acc.detach(trainer.accelerator)  # a previous train() that raised may have left hooks behind
        cfg = self._finalised_config(args, state, kwargs.get("train_dataloader"))
        if _trainer_ds_config(trainer) is None and args.max_grad_norm:
            # Clip the raw gradient inside the preconditioner; the Trainer's clip would hit the
            # preconditioned direction. Restored at on_train_end.
            if cfg.grad_clip > 0 and cfg.grad_clip != float(args.max_grad_norm):
                raise ConfigError(
                    f"ds_soo.grad_clip={cfg.grad_clip:g} and max_grad_norm={args.max_grad_norm:g} disagree; "
                    "both clip the raw gradient, so set one of them"
                )
            cfg.grad_clip = float(args.max_grad_norm)
            self._saved_max_grad_norm = args.max_grad_norm
            args.max_grad_norm = 0.0
        pre = acc.attach_resolved(
            trainer.accelerator,
            trainer.model_wrapped,
            cfg,
            optimizer=trainer.optimizer,
            global_batch_size=self._global_batch_size(args),
        )
        if self.resume_from:
            self._load(pre, self.resume_from)
        self.preconditioner = pre
        self._run = _Run(pre, pre.counters["optimizer_steps"], state.global_step)
        if state.is_world_process_zero:
            log.info(pre.describe())

    def on_step_end(self, args, state, control, **kwargs):
        run = self._run
        if run is None:
            return
        ran = run.pre.counters["optimizer_steps"] - run.first_pre_step
        steps = state.global_step - run.first_global_step
        if ran != steps:
            raise RuntimeError(
                f"ds_soo: {ran} preconditioning steps for {steps} optimizer steps. Preconditioning runs inside "
                "accelerator.backward (or DeepSpeed's engine.step); a training_step that calls loss.backward() "
                "itself bypasses it"
            )
        micros, self._micros = self._micros, []
        if run.pre.wants_damping_feedback:
            self._damping_feedback(run.pre, micros)

    def _damping_feedback(self, pre: Preconditioner, micros: list) -> None:
        """The step's loss before and after the optimizer step, on the same micro-batches, each scaled as
        the Trainer scaled it for the backward (gradient accumulation, ``num_items_in_batch``)."""
        if not micros:
            raise RuntimeError(
                "ds_soo: damping.kind is 'adaptive' but no micro-batch loss was recorded this step; a "
                "training_step that does not call self.compute_loss bypasses it"
            )
        before = after = 0.0
        with torch.no_grad(), pre.paused_capture():
            for model, inputs, loss_kwargs, computed, propagated in micros:
                with self.trainer.compute_loss_context_manager():
                    again = self._compute_loss(model, dict(inputs), **loss_kwargs)
                computed, propagated = float(computed.float().mean()), float(propagated.float().mean())
                factor = propagated / computed if computed != 0.0 else 0.0
                before += propagated
                after += float(again.float().mean()) * factor
        pre.damping_feedback(before, after)

    def on_save(self, args, state, control, **kwargs):
        """Each rank writes the curvature blocks it owns; ``save_only_model`` keeps no optimizer state, nor this."""
        if self.preconditioner is None or args.save_only_model:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)  # other ranks may get here before rank 0 has written the folder
        pre = self.preconditioner
        payload = {"world_size": pre.world_size, "state": pre.state_dict()}
        torch.save(payload, os.path.join(folder, STATE_FILE.format(rank=pre.rank)))

    def on_train_end(self, args, state, control, **kwargs):
        acc.detach(self.trainer.accelerator)  # keeps self.preconditioner and its counters for inspection
        if self._saved_max_grad_norm is not None:
            args.max_grad_norm = self._saved_max_grad_norm
            self._saved_max_grad_norm = None
        self._run = None
        self.resume_from = None

    # ------------------------------------------------------------------ helpers
    def _global_batch_size(self, args) -> int:
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)

    def _finalised_config(self, args, state, train_dataloader) -> PreconditionerConfig:
        """A copy of the config with the Trainer's step counts filled in where the user left them unset."""
        ds_config = _trainer_ds_config(self.trainer)
        cfg = copy.deepcopy(acc.resolve_config(self.config, ds_config))
        sched = cfg.schedule
        if sched.total_steps is None and state.max_steps > 0:
            sched.total_steps = int(state.max_steps)
        if sched.steps_per_epoch is None and train_dataloader is not None:
            try:
                batches = len(train_dataloader)
            except TypeError:  # an IterableDataset has no length
                batches = 0
            if batches:
                sched.steps_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
        return cfg

    def _load(self, pre: Preconditioner, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE.format(rank=pre.rank))
        if not os.path.isfile(path):
            log.warning("ds_soo: %s not found; curvature restarts from scratch", path)
            return
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("world_size") != pre.world_size:
            log.warning(
                "ds_soo: checkpoint was written with %s ranks, now %s; curvature restarts from scratch",
                payload.get("world_size"),
                pre.world_size,
            )
            return
        pre.load_state_dict(payload["state"])


def enable_second_order(trainer: Trainer, config: ConfigLike = None) -> SecondOrderCallback:
    """Turn on K-FAC/Shampoo preconditioning for an existing ``Trainer`` (any subclass); returns the callback.

    ``config`` is a ds_soo dict or :class:`PreconditionerConfig`; under ``deepspeed=`` it defaults to the
    DeepSpeed config's ``"ds_soo"`` block. Errors in either surface here, before any training.
    """
    if any(isinstance(cb, SecondOrderCallback) for cb in trainer.callback_handler.callbacks):
        raise RuntimeError("ds_soo is already enabled on this Trainer")
    if isinstance(trainer.optimizer, SecondOrderOptimizer):
        raise ConfigError(
            "the Trainer was given a SecondOrderOptimizer: with enable_second_order that would precondition twice, "
            "and under deepspeed= the Trainer discards it; pass the base optimizer (or none) instead"
        )
    ds_config = _trainer_ds_config(trainer)
    cfg = None if config is None else PreconditionerConfig.from_dict(config)
    acc.resolve_config(cfg, ds_config)  # fail fast on a missing/duplicate block or unset clipping
    if ds_config is None and trainer.optimizer is not None:
        acc.check_base_optimizer(acc.resolve_config(cfg, None), trainer.optimizer)
    callback = SecondOrderCallback(trainer, cfg)
    trainer.add_callback(callback)
    _remember_resume_path(trainer, callback)
    _record_micro_batches(trainer, callback)
    return callback


def _record_micro_batches(trainer: Trainer, callback: SecondOrderCallback) -> None:
    """Wrap ``training_step`` and ``compute_loss`` so that, under ``damping.kind: adaptive``, the callback
    knows each micro-batch and its loss (see :meth:`SecondOrderCallback._damping_feedback`)."""
    original_step, original_loss = trainer.training_step, trainer.compute_loss
    callback._compute_loss = original_loss

    def compute_loss(model, inputs, return_outputs: bool = False, **kwargs: Any):
        record = callback._recording
        kept = dict(inputs) if record is not None else None  # before compute_loss may pop labels
        out = original_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if record is not None:
            loss = out[0] if return_outputs else out
            record.append([model, kept, kwargs, loss.detach(), None])
        return out

    def training_step(model, inputs, *args: Any, **kwargs: Any):
        run = callback._run
        if run is None or run.pre.adaptive is None:
            return original_step(model, inputs, *args, **kwargs)
        callback._recording = record = []
        try:
            propagated = original_step(model, inputs, *args, **kwargs)
        finally:
            callback._recording = None
        if len(record) != 1:
            raise RuntimeError(f"ds_soo: a training_step computed {len(record)} losses; adaptive damping expects one")
        record[0][4] = propagated.detach()
        callback._micros.append(record[0])
        return propagated

    trainer.compute_loss = compute_loss
    trainer.training_step = training_step


def _remember_resume_path(trainer: Trainer, callback: SecondOrderCallback) -> None:
    """Wrap ``trainer.train`` so that the callback knows which checkpoint holds the curvature state."""
    original_train = trainer.train

    def train(resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(trainer.args.output_dir)
        callback.resume_from = path if isinstance(path, str) else None
        return original_train(resume_from_checkpoint, *args, **kwargs)

    trainer.train = train


class SecondOrderTrainer(Trainer):
    """``transformers.Trainer`` with K-FAC/Shampoo/PSGD preconditioning; ``ds_soo=`` takes the config.

    Everything else (arguments, DDP, DeepSpeed, checkpoints, logging) is the plain Trainer's.
    """

    def __init__(self, *args: Any, ds_soo: ConfigLike = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ds_soo_callback = enable_second_order(self, ds_soo)

    @property
    def preconditioner(self) -> Preconditioner | None:
        """The last ``train()``'s Preconditioner (None before training)."""
        return self.ds_soo_callback.preconditioner

    def compute_loss(self, model, inputs, return_outputs: bool = False, **kwargs: Any):
        """The Trainer's loss; with ``kfac.fisher: mc`` also the sampled-label backward that feeds G."""
        pre = self.preconditioner if self.ds_soo_callback._run is not None else None
        wants_mc = pre is not None and pre.cfg.method == "kfac" and pre.cfg.kfac.fisher == "mc" and model.training
        if not wants_mc:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[1]
        # The training loss of a micro-batch is scaled by 1/accumulation steps (by the Trainer or DeepSpeed).
        pre.mc_fisher_backward(logits, loss_scale=1.0 / max(self.args.gradient_accumulation_steps, 1))
        return (loss, outputs) if return_outputs else loss


__all__ = ["BLOCK_KEY", "STATE_FILE", "SecondOrderCallback", "SecondOrderTrainer", "enable_second_order"]
