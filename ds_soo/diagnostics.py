"""The research's curvature-quality index c(P) = E[dg^T P dg + dtheta^T P^-1 dtheta], by random probes.

dtheta is a random probe on the preconditioned parameters and dg = H dtheta its Hessian-vector
product (double backward through ``loss_fn``). A preconditioner close to the inverse curvature keeps
both terms small and balanced; an iteratively estimated one (PSGD) shows here how far it still is.
Single-process only: it needs the full parameters and a closure that recomputes the loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ds_soo.preconditioner import Preconditioner


def _apply_p(pre: Preconditioner, bid: str, mat: torch.Tensor) -> torch.Tensor:
    state = pre.states[bid]
    # Shampoo's grafted step mutates grafting state, so use the raw root product here.
    return state.raw_direction(mat) if hasattr(state, "raw_direction") else state.precondition(mat)


def _gather(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The elements of ``flat`` a block index names, 1-D (a column tile's index is 2-D)."""
    return flat[idx.reshape(-1).to(flat.device)]


def quality_index(
    pre: Preconditioner, loss_fn: Callable[[], torch.Tensor], probes: int = 4, generator: torch.Generator | None = None
) -> float | None:
    """Mean over probes of sum over ready blocks of dg^T P dg + dtheta^T P^-1 dtheta (None if no block is ready)."""
    if pre.world_size != 1:
        raise RuntimeError("quality_index needs the full model in one process")
    ready = [b for b in pre.blocks if b.block_id in pre.states and pre.states[b.block_id].ready]
    if not ready:
        return None
    named = dict(pre.model.named_parameters())
    names = sorted({n for b in ready for n, _ in b.pieces})
    params = [named[n] for n in names]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    total = 0.0
    damping = pre.damping()
    for _ in range(probes):
        vs = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params]
        hvs = torch.autograd.grad(grads, params, vs, retain_graph=True)
        v_flat = {n: v.detach().reshape(-1) for n, v in zip(names, vs, strict=True)}
        h_flat = {n: h.detach().reshape(-1) for n, h in zip(names, hvs, strict=True)}
        for block in ready:
            dtheta = block.to_matrix(torch.cat([_gather(v_flat[n], idx) for n, idx in block.pieces]))
            dg = block.to_matrix(torch.cat([_gather(h_flat[n], idx) for n, idx in block.pieces]))
            state = pre.states[block.block_id]
            total += float((dg.double() * _apply_p(pre, block.block_id, dg)).sum())
            total += float((dtheta.double() * state.inverse_apply(dtheta, damping)).sum())
    value = total / probes
    pre.last_quality = value
    return value
