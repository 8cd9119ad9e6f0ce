"""DDP (or a plain model whose gradients the caller all-reduced): every rank holds the full ``.grad``."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ds_soo.distributed.engines import ScalerAware
from ds_soo.distributed.layout import ParamLayout, writable_flat


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DistributedDataParallel, so names match the unwrapped model's."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class DDPGradientAccess(ScalerAware):
    """Gradients are replicated: every rank holds all of each ``.grad`` and provides an even slice.

    ``scaler`` (a ``torch.amp.GradScaler``) makes :meth:`grad_scale` report its current scale.
    """

    def __init__(self, model: torch.nn.Module, group: dist.ProcessGroup | None = None, scaler=None):
        self.module = unwrap(model)
        self.group = group
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.scaler = scaler
        self._params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        first = next(iter(self._params.values()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._layouts = {n: ParamLayout.replicated(n, tuple(p.shape), self.world_size) for n, p in self._params.items()}

    def param_layouts(self) -> dict[str, ParamLayout]:
        return dict(self._layouts)

    def local_grad(self, name: str) -> torch.Tensor | None:
        g = self._params[name].grad
        return None if g is None else writable_flat(g, f"{name}: .grad")

    def local_param(self, name: str) -> torch.Tensor | None:
        return self._params[name].detach().reshape(-1)
