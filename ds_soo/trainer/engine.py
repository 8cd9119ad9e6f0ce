"""The boundary between the training loop and whatever runs the model (one process now; DDP, FSDP2
and DeepSpeed later).

The loop only ever calls :meth:`EngineLoop.backward`, :meth:`EngineLoop.step` and
:meth:`EngineLoop.zero_grad`, so a distributed engine replaces exactly three calls plus
:meth:`EngineLoop.wrap`; :meth:`EngineLoop.shard` (this rank's slice of the global batch),
:meth:`EngineLoop.reduce_mean` (global logged values) and :attr:`EngineLoop.is_main` (who writes files)
are the other rank-aware points. Register a new engine in :data:`ENGINES` under its ``train.engine`` name.

Order matters and is fixed here: the preconditioner is built on the module the engine will run (after
wrapping), and it runs after the last backward of a step and before the base optimizer, as the design
requires.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
PreconditionerFactory = Callable[[nn.Module], Any]


class EngineLoop:
    """Single-process engine; subclasses override :meth:`wrap`, :meth:`backward` and :meth:`step`."""

    name = "single"

    def __init__(
        self,
        model: nn.Module,
        make_optimizer: OptimizerFactory,
        make_preconditioner: PreconditionerFactory,
        device: torch.device,
        grad_accum: int = 1,
        bf16: bool = False,
        grad_clip: float = 0.0,
    ) -> None:
        self.device = device
        self.grad_accum = grad_accum
        self.bf16 = bf16
        self.grad_clip = grad_clip
        self.model, self.optimizer, self.preconditioner = self.wrap(model, make_optimizer, make_preconditioner)

    # -- where the model and optimizer get wrapped ------------------------------------------------
    def wrap(
        self, model: nn.Module, make_optimizer: OptimizerFactory, make_preconditioner: PreconditionerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """Place the model, then build the optimizer and the preconditioner (None for first order)."""
        model = model.to(self.device)
        optimizer = make_optimizer(model)
        return model, optimizer, make_preconditioner(model)

    @property
    def module(self) -> nn.Module:
        """The bare model (engines that wrap it return the inner module here)."""
        return self.model

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_main(self) -> bool:
        return True

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of the global batch (all of it in one process)."""
        return batch

    # -- the three calls of the loop ------------------------------------------------------------
    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss; gradients accumulate to the mean over the step."""
        (loss / self.grad_accum).backward()

    def step(self) -> bool:
        """Precondition the accumulated gradients, clip the update direction, step the base optimizer.

        Returns whether the preconditioner changed the gradients this step. A step the preconditioner
        skipped for non-finite gradients skips the base update too, as ``SecondOrderOptimizer`` does.
        """
        pre = self.preconditioner
        changed = bool(pre.step()) if pre is not None else False
        if pre is not None and getattr(pre, "last_step_skipped", False):
            return False
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return changed

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reduce_mean(self, value: float) -> float:
        """Average a scalar over ranks (identity here) so logged losses are global."""
        return value


ENGINES: dict[str, type[EngineLoop]] = {"single": EngineLoop}
