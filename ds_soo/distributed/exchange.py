"""Moves curvature statistics and gradient blocks between ranks and their owners.

``LocalExchange`` is the single-process case (no collectives). ``CollectiveExchange`` (in
``ds_soo/distributed/collective.py``) implements the same four calls with coalesced torch.distributed
collectives. The preconditioner only ever calls these four methods.

A *block index* maps a block id to the list of ``(param_name, flat_indices)`` pieces whose
concatenation, in order, is the block's flat gradient vector. An index is an integer tensor whose
elements in row-major order (``idx.reshape(-1)``) are flat positions in the parameter. It may be a 1-D
tensor of its own, or a 1-D or 2-D view of a shared range (``full_range``), which costs no index memory:
a band of whole rows is a 1-D slice of it, a column tile a 2-D strided view of it. Consumers that need
the positions as a list flatten first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ds_soo.curvature.precision import as_state
from ds_soo.distributed.layout import GradientAccess

# block id -> [(param_name, index)]; an index's elements in row-major order are flat positions.
BlockIndex = dict[str, list[tuple[str, torch.Tensor]]]


class Exchange(Protocol):
    rank: int
    world_size: int

    def reduce_to_owners(self, tensors: dict[str, torch.Tensor], owner_of: dict[str, int]) -> dict[str, torch.Tensor]:
        """Sum each tensor over ranks; return only the sums this rank owns. Every rank passes every key."""
        ...

    def gather_blocks(
        self, blocks: BlockIndex, owner_of: dict[str, int], read: Callable[[str], torch.Tensor | None] | None = None
    ) -> dict[str, torch.Tensor | None]:
        """Assemble each owned block's full averaged gradient vector on its owner (None: no rank had a grad).

        ``read(name)`` replaces ``access.local_grad`` as the source: any tensor in the held layout (the
        damping rule gathers the step's weight change this way)."""
        ...

    def scatter_blocks(self, blocks: BlockIndex, owner_of: dict[str, int], results: dict[str, torch.Tensor]) -> None:
        """Write each owner's result vectors back into every rank's held gradient storage."""
        ...

    def any_true(self, flag: bool) -> bool:
        """True on every rank if the flag is true on any rank (consistent skip decisions)."""
        ...

    def any_true_many(self, flags: list[bool]) -> list[bool]:
        """Element-wise ``any_true`` of a list of flags, in one collective."""
        ...

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``t`` over ranks, on every rank (one collective)."""
        ...


class LocalExchange:
    """World size 1: gradients are read from and written to ``access.local_grad`` directly."""

    rank = 0
    world_size = 1

    def __init__(self, access: GradientAccess):
        self.access = access

    def reduce_to_owners(self, tensors, owner_of):
        return dict(tensors)

    def gather_blocks(self, blocks, owner_of, read=None):
        read = read or self.access.local_grad
        out: dict[str, torch.Tensor | None] = {}
        for bid, pieces in blocks.items():
            parts, seen = [], False
            for name, idx in pieces:
                g = read(name)
                if g is None:
                    parts.append(None)
                else:
                    seen = True
                    parts.append(as_state(_take(g.detach(), idx)))
            if seen:  # a missing piece is zeros, in the dtype of the pieces that are there
                dtype = next(p for p in parts if p is not None).dtype
                parts = [torch.zeros(idx.numel(), dtype=dtype, device=idx.device) if p is None else p
                         for p, (_, idx) in zip(parts, pieces, strict=True)]
            out[bid] = torch.cat(parts) if seen else None
        return out

    def scatter_blocks(self, blocks, owner_of, results):
        for bid, vec in results.items():
            offset = 0
            for name, idx in blocks[bid]:
                n = idx.numel()
                g = self.access.local_grad(name)
                if g is not None:
                    _put(g, idx, vec[offset : offset + n])
                offset += n

    def any_true(self, flag: bool) -> bool:
        return bool(flag)

    def any_true_many(self, flags: list[bool]) -> list[bool]:
        return [bool(f) for f in flags]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t


_IDENTITY: dict[int, tuple[torch.Tensor, bool]] = {}
# Every shared range ever handed out (kept alive: the views in blocks point into them). Each is twice the
# last, so together they hold less than 4x the longest range asked for.
_RANGES: list[torch.Tensor] = [torch.arange(0)]


def full_range(n: int, start: int = 0) -> torch.Tensor:
    """``arange(start, n)`` as a view of one shared host tensor: a piece covering a whole parameter, or a
    band of whole rows of one, costs no index memory of its own (an int64 per element would be 8 bytes
    for every 4-byte weight), and it is read and written as a view instead of a gather. A column tile
    is a 2-D view of it, ``full_range(rows * cols).view(rows, cols)[r0:r1, c0:c1]``, for the same reason."""
    if n > _RANGES[-1].numel():
        _RANGES.append(torch.arange(max(n, 2 * _RANGES[-1].numel())))
    return _RANGES[-1][start:n]


def _range_offset(idx: torch.Tensor) -> int | None:
    """Where ``idx`` starts in a shared range if it is a view of one, else None. The ranges are aranges,
    so each element of such a view equals its storage position: the view's strides and offset are
    those of the gradient elements it names."""
    if idx.device.type != "cpu":
        return None
    ptr = idx.untyped_storage().data_ptr()
    if any(r.untyped_storage().data_ptr() == ptr for r in _RANGES):
        return idx.storage_offset()
    return None


def _range_start(idx: torch.Tensor) -> int | None:
    """Where ``idx`` starts if it is a 1-D ``full_range`` view (consecutive indices), else None."""
    if idx.dim() != 1 or (idx.numel() > 1 and idx.stride(0) != 1):
        return None
    return _range_offset(idx)


def _is_identity(g: torch.Tensor, idx: torch.Tensor) -> bool:
    """Whether an index tensor of its own is arange(numel) of the whole parameter (checked once, cached)."""
    if idx.numel() != g.numel():
        return False
    cached = _IDENTITY.get(id(idx))
    if cached is None or cached[0] is not idx:
        same = bool(torch.equal(idx.reshape(-1), torch.arange(idx.numel(), device=idx.device)))
        cached = _IDENTITY[id(idx)] = (idx, same)
    return cached[1]


def _view_of(g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
    """What ``idx`` covers of the flat gradient ``g`` as a view (the whole of it, a band of consecutive
    elements, or a strided column tile), so that reading or writing it needs no gather; None when only
    a gather will do (an index of its own, or a ``g`` that is not contiguous)."""
    offset = _range_offset(idx)
    if offset is None:
        return g if _is_identity(g, idx) else None
    if offset == 0 and idx.numel() == g.numel() and idx.is_contiguous():
        return g
    if not g.is_contiguous() or idx.numel() == 0:
        return None
    last = offset + sum((size - 1) * stride for size, stride in zip(idx.shape, idx.stride(), strict=True))
    if last >= g.numel():
        return None  # not within g: the gather raises
    return g.reshape(-1).as_strided(idx.shape, idx.stride(), g.storage_offset() + offset)


def _take(g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The elements ``idx`` names, as a 1-D tensor (a view where they are consecutive)."""
    view = _view_of(g, idx)
    return view.reshape(-1) if view is not None else g[idx.reshape(-1).to(g.device)]


def _put(g: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """Write the 1-D ``values`` to the elements ``idx`` names, in its row-major order."""
    view = _view_of(g, idx)
    if view is not None:
        view.copy_(values.to(g.dtype).reshape(view.shape))
    else:
        g[idx.reshape(-1).to(g.device)] = values.to(g.dtype)
