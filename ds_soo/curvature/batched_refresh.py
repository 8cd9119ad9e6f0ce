"""A refresh's damped inverses and inverse roots, one batched factorisation per factor shape.

A refresh step recomputes every due block's factor inverses. Done block by block that is one Cholesky
or eigh per factor (two per block), a step-time spike on a GPU with ~100 blocks. Here the blocks' factor
matrices are grouped by (kind, root, method, size, device), stacked, and each group takes ONE batched
``cholesky_ex`` + ``cholesky_inverse`` or ``eigh``, with each matrix's own damping.

Per matrix the semantics are ``linalg.damped_inverse`` / ``linalg.inverse_root``'s: a matrix whose
batched result is unusable (a failed factorisation, a non-positive damped eigenvalue, a non-finite
output, a non-finite input), or every matrix of a group whose batched call raises, goes through that
per-matrix routine, which retries in fp64 and gives None on failure. A block commits its new pair only
if all its factors succeeded (``commit_refresh``); otherwise it keeps the previous pair.

The states' two-phase API: ``refresh_scalars() -> list[tensor]`` (device scalars the requests need on
the host, read for all states at once), ``refresh_requests(damping, scalars) -> list[Request]`` and
``commit_refresh({key: tensor | None}) -> bool``; their ``refresh`` is the same two phases solved one
matrix at a time (``solve_each``). Knows nothing of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ds_soo.curvature.iterative_roots import coupled_newton_inverse_root
from ds_soo.curvature.linalg import damped_inverse, inverse_root, root_from_eigh, working_dtype
from ds_soo.curvature.precision import state_dtype

INVERSE = "inverse"  # (M + rho I)^-1 via Cholesky
ROOT = "root"  # (M + rho I)^(-1/root) via eigh, or the coupled Newton iteration (Request.method)
DIAGONAL = "diagonal"  # a vector of diagonal statistics d: (max(d, 0) + rho)^(-1/root), elementwise


@dataclass(frozen=True)
class Request:
    """One factor to invert: the state's field ``key`` gets the result."""

    key: str
    matrix: torch.Tensor
    kind: str
    damping: float
    root: float = 1.0
    method: str = "eigh"  # ROOT only: "eigh" or "newton" (the coupled Newton iteration, eigh fallback)


def solve_one(req: Request, dtype: torch.dtype, retry_float64: bool) -> torch.Tensor | None:
    """One request through the per-matrix routine (a result in the matrix's state dtype, or None)."""
    if req.kind == INVERSE:
        return damped_inverse(req.matrix, req.damping, dtype, retry_float64)
    if req.kind == ROOT:
        return inverse_root(req.matrix, int(req.root), req.damping, dtype, retry_float64, method=req.method)
    if req.kind == DIAGONAL:
        out = _diagonal_root(req)
        return out if bool(torch.isfinite(out).all()) else None
    raise ValueError(f"unknown request kind {req.kind!r}")


def _diagonal_root(req: Request) -> torch.Tensor:
    return (req.matrix.double().clamp_min(0.0) + req.damping).pow(-1.0 / req.root).to(state_dtype(req.matrix.dtype))


def solve_each(requests: list[Request], dtype: torch.dtype, retry_float64: bool) -> dict[str, torch.Tensor | None]:
    return {r.key: solve_one(r, dtype, retry_float64) for r in requests}


def _batched_cholesky(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Indirection so tests can inject failures; (factors, info) and never raises on a non-PD matrix.
    return torch.linalg.cholesky_ex(m)


def _batched_eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.linalg.eigh(m)


def _batched_attempt(reqs: list[Request], dtype: torch.dtype) -> tuple[torch.Tensor, list[bool]]:
    """The group's results in ``dtype`` (B, n, n) and which of them are usable (may raise)."""
    m = torch.stack([r.matrix for r in reqs]).to(dtype)
    m = 0.5 * (m + m.transpose(-1, -2))
    damp = torch.tensor([r.damping for r in reqs], dtype=dtype, device=m.device)
    if reqs[0].kind == INVERSE:
        eye = torch.eye(m.shape[-1], dtype=dtype, device=m.device)
        chol, info = _batched_cholesky(m + damp.view(-1, 1, 1) * eye)
        out = torch.cholesky_inverse(chol)
        ok = (info == 0) & torch.isfinite(out).flatten(1).all(1)
    elif reqs[0].method == "newton":
        # Unconverged matrices get solve_one below: Newton again, then eigh on its own.
        newton = coupled_newton_inverse_root(m, int(reqs[0].root), damp, dtype=dtype)
        out, ok = newton.root, newton.ok
    else:
        evals, evecs = _batched_eigh(m)
        out, ok = root_from_eigh(evals, evecs, reqs[0].root, damp)
    return out, ok.tolist()


def solve(requests: list[Request], dtype: torch.dtype, retry_float64: bool) -> list[torch.Tensor | None]:
    """Every request's result (in its matrix's state dtype, or None), one batched factorisation per group
    of equal kind and size."""
    results: list[torch.Tensor | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    diagonal = [i for i, r in enumerate(requests) if r.kind == DIAGONAL]
    if diagonal:  # elementwise, nothing to factorise; one host read says which results are finite
        outs = [_diagonal_root(requests[i]) for i in diagonal]
        finite = torch.stack([torch.isfinite(o).all() for o in outs]).tolist()
        for i, out, ok in zip(diagonal, outs, finite, strict=True):
            results[i] = out if ok else None
    for i, r in enumerate(requests):
        if r.kind == DIAGONAL:
            continue
        key = (r.kind, r.root, r.method, tuple(r.matrix.shape), r.matrix.device, r.matrix.dtype)
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        finite = torch.stack([requests[i].matrix for i in idx]).isfinite().flatten(1).all(1).tolist()
        batch = [i for i, f in zip(idx, finite, strict=True) if f]
        usable: dict[int, torch.Tensor] = {}
        tried: set[int] = set()
        if len(batch) > 1:
            try:
                out, ok = _batched_attempt([requests[i] for i in batch], working_dtype(dtype, requests[idx[0]].matrix))
                usable = {i: out[j] for j, i in enumerate(batch) if ok[j]}
                tried = set(batch)
            except (RuntimeError, torch.linalg.LinAlgError):
                pass
        # Whatever the batch could not give (a non-finite input included) gets the per-matrix semantics;
        # a matrix the batched Newton iteration already failed on goes straight to its eigh fallback.
        for i in idx:
            req = requests[i]
            if i in usable:
                results[i] = usable[i].to(state_dtype(req.matrix.dtype), copy=True)
            else:
                results[i] = solve_one(replace(req, method="eigh") if i in tried else req, dtype, retry_float64)
    return results


def refresh_states(states: list[Any], damping: float, dtype: torch.dtype, retry_float64: bool) -> list[bool]:
    """Refresh these states' inverses together; per state, whether it committed a new pair."""
    # The host scalars the states' requests need (K-FAC's traces for its pi-split): one read for all.
    wanted = [s.refresh_scalars() for s in states]
    flat = [x for xs in wanted for x in xs]
    values = iter(torch.stack(flat).tolist() if flat else [])
    per_state = [s.refresh_requests(damping, [next(values) for _ in xs]) for s, xs in zip(states, wanted, strict=True)]
    flat = [r for reqs in per_state for r in reqs]
    results = iter(solve(flat, dtype, retry_float64))
    return [s.commit_refresh({r.key: next(results) for r in reqs}) for s, reqs in zip(states, per_state, strict=True)]
