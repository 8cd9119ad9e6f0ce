"""Damped inverses and inverse matrix roots that never return NaN.

Each routine runs in the requested dtype (fp32 by default; never narrower than the matrix's own: a
float64 statistic is factorised in float64), retries in fp64 when the first attempt raises or produces
non-finite values, returns its result in the matrix's state dtype (``precision.state_dtype``), and
returns ``None`` when both fail so that the caller keeps its previous preconditioner (torch's eigh
does fail on ill-conditioned inputs: pytorch#94772, #105359).
"""

from __future__ import annotations

import torch

from ds_soo.curvature.iterative_roots import coupled_newton_inverse_root
from ds_soo.curvature.precision import state_dtype


def _eigh(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Indirection so tests can inject failures.
    return torch.linalg.eigh(mat)


def _cholesky(mat: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(mat)


def _symmetrize(mat: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mat + mat.transpose(-1, -2))


def working_dtype(dtype: torch.dtype, mat: torch.Tensor) -> torch.dtype:
    """The dtype a factorisation of ``mat`` runs in: ``dtype``, or the matrix's state dtype if that is wider."""
    return torch.promote_types(dtype, state_dtype(mat.dtype))


def _attempts(dtype: torch.dtype, retry_float64: bool) -> list[torch.dtype]:
    return [dtype, torch.float64] if retry_float64 and dtype != torch.float64 else [dtype]


def damped_inverse(
    mat: torch.Tensor, damping: float, dtype: torch.dtype = torch.float32, retry_float64: bool = True
) -> torch.Tensor | None:
    """(mat + damping I)^-1 via Cholesky, in ``mat``'s state dtype; None if every attempt failed."""
    if not bool(torch.isfinite(mat).all()):
        return None  # an Inf statistic can still yield a finite (meaningless) inverse
    out_dtype = state_dtype(mat.dtype)
    for dt in _attempts(working_dtype(dtype, mat), retry_float64):
        try:
            m = _symmetrize(mat.to(dt))
            m = m + damping * torch.eye(m.shape[0], dtype=dt, device=m.device)
            chol = _cholesky(m)
            inv = torch.cholesky_inverse(chol)
            if torch.isfinite(inv).all():
                return inv.to(out_dtype)
        except (RuntimeError, torch.linalg.LinAlgError):
            continue
    return None


def inverse_root(
    mat: torch.Tensor,
    root: int,
    damping: float,
    dtype: torch.dtype = torch.float32,
    retry_float64: bool = True,
    method: str = "eigh",
) -> torch.Tensor | None:
    """(mat + damping I)^(-1/root) via a symmetric eigendecomposition; None if every attempt failed.

    Eigenvalues are clamped at zero before damping, since a PSD statistic can only go negative
    through round-off.

    ``method="newton"`` first runs the matmul-only coupled Newton iteration in ``dtype``
    (``ds_soo/curvature/iterative_roots.py``; batched over leading dims; host reads: its iteration
    count before the loop, its "converged and finite" mask after); each matrix of a stack it did not
    converge on goes through the eigh path on its own (with its fp64 retry, and None if that fails too).
    """
    if method not in ("eigh", "newton"):
        raise ValueError(f"method must be 'eigh' or 'newton', got {method!r}")
    if not bool(torch.isfinite(mat).all()):
        return None
    dtype = working_dtype(dtype, mat)
    if method == "newton":
        return _newton_then_eigh(mat, root, damping, dtype, retry_float64)
    for dt in _attempts(dtype, retry_float64):
        try:
            evals, evecs = _eigh(_symmetrize(mat.to(dt)))
            out, ok = root_from_eigh(evals, evecs, root, damping)
            if bool(ok.all()):
                return out.to(state_dtype(mat.dtype))
        except (RuntimeError, torch.linalg.LinAlgError):
            continue
    return None


def root_from_eigh(
    evals: torch.Tensor, evecs: torch.Tensor, root: float, damping: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M + damping I)^(-1/root) from M's eigendecomposition, for one matrix or a stack (``damping``: a
    float, or one per matrix), and which results are usable (positive damped eigenvalues, finite).

    Eigenvalues are clamped at zero before damping: a PSD statistic goes negative only by round-off.
    """
    if isinstance(damping, torch.Tensor):
        damping = damping.unsqueeze(-1)
    damped = evals.clamp_min(0.0) + damping
    # Scale eigenvector columns: (..., 1, n) broadcasts over a stack of matrices too.
    out = (evecs * damped.pow(-1.0 / root).unsqueeze(-2)) @ evecs.transpose(-1, -2)
    ok = (damped > 0).all(-1) & torch.isfinite(out).flatten(-2).all(-1)
    return out, ok


def _newton_then_eigh(
    mat: torch.Tensor, root: int, damping: float, dtype: torch.dtype, retry_float64: bool
) -> torch.Tensor | None:
    res = coupled_newton_inverse_root(mat, root, damping, dtype=dtype)
    ok = res.ok.reshape(-1)
    out_dtype = state_dtype(mat.dtype)
    if bool(ok.all()):
        return res.root.to(out_dtype)
    n = mat.shape[-1]
    out = res.root.to(out_dtype).reshape(-1, n, n).clone()
    mats = mat.reshape(-1, n, n)
    for i in (~ok).nonzero().squeeze(-1).tolist():  # one matrix at a time: failures are rare
        alone = inverse_root(mats[i], root, damping, dtype, retry_float64)
        if alone is None:
            return None
        out[i] = alone
    return out.reshape(mat.shape)


def matrix_power_psd(mat: torch.Tensor, power: float, damping: float = 0.0) -> torch.Tensor:
    """(mat + damping I)^power in float64, for diagnostics and references (may raise)."""
    m = _symmetrize(mat.double())
    evals, evecs = torch.linalg.eigh(m)
    evals = evals.clamp_min(0.0) + damping
    return (evecs * evals.pow(power)) @ evecs.T
