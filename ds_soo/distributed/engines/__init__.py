"""One GradientAccess adapter per training engine: where each rank's piece of each averaged gradient
lives at the optimizer-step boundary. Each module imports its engine lazily; ``access_for`` picks one."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ds_soo.distributed.layout import GradientAccess


def access_for(model: Any, **kwargs: Any) -> GradientAccess:
    """The adapter for ``model``: a DeepSpeed engine, an FSDP2 (``fully_shard``) module, or DDP/plain."""
    if type(model).__name__ == "DeepSpeedEngine" or hasattr(model, "zero_optimization_stage"):
        from ds_soo.distributed.engines.deepspeed import DeepSpeedGradientAccess

        return DeepSpeedGradientAccess(model, **kwargs)
    from ds_soo.distributed.engines.fsdp2 import is_fsdp2

    if is_fsdp2(model):
        from ds_soo.distributed.engines.fsdp2 import FSDP2GradientAccess

        return FSDP2GradientAccess(model, **kwargs)
    from ds_soo.distributed.engines.ddp import DDPGradientAccess

    return DDPGradientAccess(model, **kwargs)


def nonfinite_anywhere(access: Any, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank if any rank's held gradient has an inf or NaN (one all_reduce).

    With fp16 loss scaling this is exactly when the engine will skip the step, so a preconditioner
    checks it first and then neither updates curvature nor writes gradients.
    """
    bad = False
    for name in access.param_layouts():
        g = access.local_grad(name)
        if g is not None and g.numel() and not bool(torch.isfinite(g).all()):
            bad = True
            break
    device = getattr(access, "device", None) or torch.device("cpu")
    t = torch.tensor([1 if bad else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


class ScalerAware:
    """Loss-scale reporting for adapters whose caller drives a ``torch.amp.GradScaler`` (DDP, FSDP2)."""

    scaler: Any
    group: Any

    def grad_scale(self) -> float:
        if self.scaler is not None and self.scaler.is_enabled():
            return float(self.scaler.get_scale())
        return 1.0

    def has_overflow(self) -> bool:
        """Any rank's gradient non-finite (collective); with a GradScaler that step will be skipped."""
        return nonfinite_anywhere(self, self.group)


__all__ = ["ScalerAware", "access_for", "nonfinite_anywhere"]
