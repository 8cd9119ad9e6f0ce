"""Symmetric matrices stored as their packed upper triangle: n(n+1)/2 numbers instead of n^2.

Shampoo's statistics L = sum G G^T and R = sum G^T G are symmetric, so half of a dense factor is a
copy of the other half. Stored packed they cost about half the memory; they are unpacked only when
a refresh factorises them. Works on stacks too: (..., n, n) <-> (..., n(n+1)/2), so a batch of
equal-shaped blocks packs and unpacks in one gather or scatter (no host synchronisation).
"""

from __future__ import annotations

import torch

# (n, device) -> flat positions i*n + j of the upper triangle (i <= j), row-major, and of its mirror j*n + i.
_INDEX: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def packed_size(n: int) -> int:
    return n * (n + 1) // 2


def _positions(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (n, torch.device(device))
    if key not in _INDEX:
        rows, cols = torch.triu_indices(n, n, device=device)
        _INDEX[key] = (rows * n + cols, cols * n + rows)
    return _INDEX[key]


def pack_upper(m: torch.Tensor) -> torch.Tensor:
    """The upper triangle of each (n, n) matrix of ``m``, row-major, as (..., n(n+1)/2)."""
    n = m.shape[-1]
    if m.shape[-2] != n:
        raise ValueError(f"pack_upper needs square matrices, got shape {tuple(m.shape)}")
    upper, _ = _positions(n, m.device)
    return m.reshape(*m.shape[:-2], n * n).index_select(-1, upper)


def matrix_size(packed: torch.Tensor) -> int:
    """n for a packed length n(n+1)/2 (raises if the length is not triangular)."""
    length = packed.shape[-1]
    n = int(((8 * length + 1) ** 0.5 - 1) / 2 + 0.5)
    if packed_size(n) != length:
        raise ValueError(f"{length} is not the packed length n(n+1)/2 of any n")
    return n


def unpack_upper(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric (..., n, n) matrices whose upper triangles ``packed`` holds."""
    n = matrix_size(packed)
    upper, mirror = _positions(n, packed.device)
    out = packed.new_empty(*packed.shape[:-1], n * n)
    # Lower triangle first, then the upper one: the diagonal (in both) ends up written once more, unchanged.
    out.index_copy_(-1, mirror, packed)
    out.index_copy_(-1, upper, packed)
    return out.view(*packed.shape[:-1], n, n)
