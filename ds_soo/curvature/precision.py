"""Matrix products of curvature statistics at a chosen precision, always returned in fp32.

Statistics are averages over many rows: rounding each input to TF32 or bf16 perturbs a factor far less
than one batch's sampling noise, while fp32 products run at a fraction of the tensor-core rate on a GPU.
The choice only matters on CUDA; elsewhere the product is plain fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def stats_precision(precision: str, device: torch.device) -> Iterator[None]:
    """fp32 products inside, with TF32 tensor cores allowed on CUDA when ``precision == "tf32"``."""
    if precision != "tf32" or device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def gram(rows: torch.Tensor, precision: str) -> torch.Tensor:
    """``rows^T @ rows`` in fp32 (rows are fp32), with the products at ``precision`` on CUDA."""
    if precision == "bfloat16" and rows.is_cuda:
        low = rows.bfloat16()
        return (low.T @ low).float()  # fp32 accumulation inside the tensor cores, bf16 result
    with stats_precision(precision, rows.device):
        return rows.T @ rows
