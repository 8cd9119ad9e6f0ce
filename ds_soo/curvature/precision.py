"""The dtype curvature state is kept in, and statistics products at a chosen precision.

State follows the model: a float64 parameter gets float64 statistics, roots and inverses (so that a
float64 model is preconditioned in float64 end to end), anything narrower (fp32, bf16, fp16) gets fp32.

Statistics are averages over many rows: rounding each input to TF32 or bf16 perturbs a factor far less
than one batch's sampling noise, while fp32 products run at a fraction of the tensor-core rate on a GPU.
The choice only matters on CUDA for fp32 rows; elsewhere, and for float64 rows, the product is exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of curvature state for a gradient or activation of ``dtype``: float64 stays float64,
    everything else is kept in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_state(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its state dtype (no copy when it already is)."""
    return t.to(state_dtype(t.dtype))


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
    """``rows^T @ rows`` in the rows' state dtype, with fp32 products at ``precision`` on CUDA."""
    if precision == "bfloat16" and rows.is_cuda and rows.dtype != torch.float64:
        low = rows.bfloat16()
        return (low.T @ low).float()  # fp32 accumulation inside the tensor cores, bf16 result
    with stats_precision(precision, rows.device):
        return rows.T @ rows
