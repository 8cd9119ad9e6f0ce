"""An optimizer-shaped wrapper: ``step()`` = precondition, then the base optimizer's step.

For code that expects a single ``torch.optim.Optimizer`` (the HF Trainer, Lightning, user loops).
A step whose gradients were non-finite skips the base update entirely, so weights and the base
optimizer's state (momentum, Adam moments, step counts) stay exactly as they were. Clip with the
preconditioner's ``grad_clip`` (the raw gradient, before preconditioning), not after this step.
"""

from __future__ import annotations

from typing import Any

import torch

from ds_soo.preconditioner import Preconditioner


class SecondOrderOptimizer(torch.optim.Optimizer):
    def __init__(self, base: torch.optim.Optimizer, preconditioner: Preconditioner):
        # Share the base optimizer's param_groups and state so LR schedulers and checkpoints see them.
        self.base = base
        self.preconditioner = preconditioner
        preconditioner.set_base_optimizer(base)
        self.defaults = base.defaults
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self):
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.base.param_groups = value

    @property
    def state(self):
        return self.base.state

    @state.setter
    def state(self, value):
        self.base.state = value

    def step(self, closure=None):
        """Precondition, then the base step. With ``damping.kind: adaptive`` a ``closure`` (zero_grad,
        forward, backward, return the loss: torch's convention) is evaluated again after an adaptation
        step, on the same batch, to measure the loss change; that second evaluation's gradients are
        zeroed. Without a closure, call ``preconditioner.damping_feedback`` yourself."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = self.base.param_groups[0].get("lr")
        if lr is not None:
            self.preconditioner.set_hyperparams(lr=lr)
        self.preconditioner.step()
        if not self.preconditioner.last_step_skipped:
            self.base.step()
        if closure is not None and loss is not None and self.preconditioner.wants_damping_feedback:
            with torch.enable_grad(), self.preconditioner.paused_capture():
                after = closure()
            self.base.zero_grad(set_to_none=True)
            self.preconditioner.damping_feedback(loss.detach(), after.detach())
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "preconditioner": self.preconditioner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict["base"])
        self.preconditioner.load_state_dict(state_dict["preconditioner"])

    def __repr__(self) -> str:
        return f"SecondOrderOptimizer({self.preconditioner.cfg.method}, base={type(self.base).__name__})"
