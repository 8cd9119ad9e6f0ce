"""The exact empirical-Fisher trace of a weight-shared layer, from its inputs and output gradients.

A layer applied at T positions per example (conv patches, tokens) has the per-example gradient
``W_m = sum_t d_t h_t^T``, so ``||W_m||^2 = sum_{t,t'} (h_t . h_t') (d_t . d_t')``: the Frobenius product
of the example's two T x T Gram matrices (the "ghost norm" of per-example gradient clipping; Goodfellow
2015, Li et al. 2022), or, when cheaper, the norm of ``W_m`` itself. KFC's A (x) G assumes the positions
uncorrelated and can miss this trace by an order of magnitude (a ViT's value and key projections, its
patch embedding); the preconditioner uses it to rescale G so that tr(A) tr(G) equals the empirical
Fisher's trace. Pure tensor math, no ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Transient fp32 values one chunk of examples may use; chunks keep the peak memory bounded.
CHUNK_BUDGET = 1 << 24


def per_example_sq_norms(h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``||d_k^T h_k||_F^2`` for (K, T, in) inputs and (K, T, out) output gradients, by the cheaper route."""
    positions, n_in, n_out = h.shape[1], h.shape[2], d.shape[2]
    if positions * (n_in + n_out) <= n_in * n_out:
        return (torch.bmm(h, h.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2))
    return torch.bmm(d.transpose(1, 2), h).pow(2).sum(dim=(1, 2))


def sum_sq_norms(
    rows_of: Callable[[int, int], torch.Tensor],
    n_in: int,
    d_rows: torch.Tensor,
    examples: int,
    limit: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of the per-example squared gradient norms of the first ``limit`` (default all) examples.

    ``rows_of(start, stop)`` gives examples ``start:stop`` as (count * T, n_in) input rows; ``d_rows`` is the
    micro-batch's (examples * T, out) output-gradient rows, positions of one example consecutive. Returns
    (sum as a 0-d tensor, examples used); nothing is synchronised with the host.
    """
    positions = d_rows.shape[0] // examples
    n_out = d_rows.shape[1]
    keep = examples if limit is None else min(limit, examples)
    d = d_rows[: keep * positions].view(keep, positions, n_out)
    per_example = positions * n_in + min(2 * positions * positions, n_in * n_out)
    chunk = max(1, CHUNK_BUDGET // max(per_example, 1))
    total = d_rows.new_zeros(())
    for start in range(0, keep, chunk):
        stop = min(keep, start + chunk)
        h = rows_of(start, stop).view(stop - start, positions, n_in)
        total = total + per_example_sq_norms(h, d[start:stop]).sum()
    return total, keep


def trace_corrected(a: torch.Tensor, g: torch.Tensor, fisher_trace: torch.Tensor) -> torch.Tensor:
    """KFC's G rescaled so that tr(A) tr(G) equals ``fisher_trace``, on the device (no host synchronisation).

    ``a`` and ``g`` are one block's factors or a stack of equal-shaped ones, ``fisher_trace`` a matching
    0-d or (blocks,) tensor. Where there is no signal (a trace not positive) or a non-finite one (which
    the step's own check catches), G is left as it is. The traces and the factor are float64; the factor
    multiplies G in G's dtype.
    """
    kron = a.diagonal(dim1=-2, dim2=-1).double().sum(-1) * g.diagonal(dim1=-2, dim2=-1).double().sum(-1)
    fisher = fisher_trace.to(kron.device, torch.float64)
    valid = (kron > 0) & torch.isfinite(kron) & (fisher > 0) & torch.isfinite(fisher)
    factor = torch.where(valid, fisher / kron, torch.ones_like(kron))
    return g * factor.to(g.dtype)[..., None, None]
