"""FSDP2 (``fully_shard``): parameters and gradients are DTensors sharded on dim 0.

Rank r holds rows ``[r*c, min((r+1)*c, d0))`` with ``c = ceil(d0 / world)``: torch.chunk semantics,
so trailing ranks can hold nothing when ``d0 < world`` or d0 is just above a multiple of it (7 rows on
4 ranks: 2, 2, 2, 1; 3 rows: 1, 1, 1, 0). FSDP2 pads its storage but the gradient's ``to_local()``
is the unpadded shard, and it arrives already averaged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ds_soo.distributed.engines import ScalerAware
from ds_soo.distributed.layout import ParamLayout, writable_flat


def is_fsdp2(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 kept it private
        from torch.distributed._composable.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard0_rows(dim0: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows of a dim-0 sharded tensor that ``rank`` holds, as ``torch.chunk`` splits them."""
    chunk = -(-dim0 // world_size) if dim0 else 0
    return min(rank * chunk, dim0), min((rank + 1) * chunk, dim0)


class FSDP2GradientAccess(ScalerAware):
    """Each rank holds and provides the contiguous flat range of its dim-0 shard of each gradient."""

    def __init__(self, model: torch.nn.Module, scaler=None):
        from torch.distributed.tensor import DTensor, Shard

        self.scaler = scaler
        self._params: dict[str, torch.nn.Parameter] = {}
        self._layouts: dict[str, ParamLayout] = {}
        mesh = None
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if not isinstance(p, DTensor):
                raise TypeError(f"{name} is not a DTensor; call fully_shard on the module that owns it")
            if len(p.placements) != 1 or p.placements[0] != Shard(0):
                raise NotImplementedError(f"{name}: only 1-D meshes with Shard(0) are supported, got {p.placements}")
            mesh = p.device_mesh if mesh is None else mesh
            if p.device_mesh != mesh:
                raise NotImplementedError(f"{name} is on a different device mesh from the other parameters")
            self._params[name] = p
        if mesh is None:
            raise ValueError("model has no trainable parameters")
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.device = next(iter(self._params.values())).to_local().device
        for name, p in self._params.items():
            shape = tuple(p.shape)
            row = 1
            for s in shape[1:]:
                row *= s
            ranges = []
            for r in range(self.world_size):
                a, b = shard0_rows(shape[0] if shape else 1, self.world_size, r)
                ranges.append((a * row, b * row))
            held = tuple(ranges)
            local = p.to_local()
            if local.numel() != held[self.rank][1] - held[self.rank][0]:
                raise RuntimeError(
                    f"{name}: local shard has {local.numel()} elements but the torch.chunk rule gives "
                    f"{held[self.rank]}; FSDP2's sharding rule has changed"
                )
            self._layouts[name] = ParamLayout(name, shape, held, held)

    # FSDP2's post-backward hooks sit on module inputs, so an extra backward that stops at layer
    # outputs (kfac.fisher: mc) would run them: refused there.
    mc_backward_safe = False

    def param_layouts(self) -> dict[str, ParamLayout]:
        return dict(self._layouts)

    def local_grad(self, name: str) -> torch.Tensor | None:
        g = self._params[name].grad
        return None if g is None else writable_flat(g.to_local(), f"{name}: local gradient shard")

    def local_param(self, name: str) -> torch.Tensor | None:
        return self._params[name].to_local().detach().reshape(-1)
