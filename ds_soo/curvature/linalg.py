"""Damped inverses and inverse matrix roots that never return NaN.

Each routine runs in the requested dtype (fp32 by default), retries in fp64 when the first attempt
raises or produces non-finite values, and returns ``None`` when both fail so that the caller keeps
its previous preconditioner (torch's eigh does fail on ill-conditioned inputs: pytorch#94772, #105359).
"""

from __future__ import annotations

import torch


def _eigh(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Indirection so tests can inject failures.
    return torch.linalg.eigh(mat)


def _cholesky(mat: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(mat)


def _symmetrize(mat: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mat + mat.transpose(-1, -2))


def _attempts(dtype: torch.dtype, retry_float64: bool) -> list[torch.dtype]:
    return [dtype, torch.float64] if retry_float64 and dtype != torch.float64 else [dtype]


def damped_inverse(
    mat: torch.Tensor, damping: float, dtype: torch.dtype = torch.float32, retry_float64: bool = True
) -> torch.Tensor | None:
    """(mat + damping I)^-1 via Cholesky, returned in float32; None if every attempt failed."""
    if not bool(torch.isfinite(mat).all()):
        return None  # an Inf statistic can still yield a finite (meaningless) inverse
    for dt in _attempts(dtype, retry_float64):
        try:
            m = _symmetrize(mat.to(dt))
            m = m + damping * torch.eye(m.shape[0], dtype=dt, device=m.device)
            chol = _cholesky(m)
            inv = torch.cholesky_inverse(chol)
            if torch.isfinite(inv).all():
                return inv.to(torch.float32)
        except (RuntimeError, torch.linalg.LinAlgError):
            continue
    return None


def inverse_root(
    mat: torch.Tensor,
    root: int,
    damping: float,
    dtype: torch.dtype = torch.float32,
    retry_float64: bool = True,
) -> torch.Tensor | None:
    """(mat + damping I)^(-1/root) via a symmetric eigendecomposition; None if every attempt failed.

    Eigenvalues are clamped at zero before damping, since a PSD statistic can only go negative
    through round-off.
    """
    if not bool(torch.isfinite(mat).all()):
        return None
    for dt in _attempts(dtype, retry_float64):
        try:
            m = _symmetrize(mat.to(dt))
            evals, evecs = _eigh(m)
            evals = evals.clamp_min(0.0) + damping
            if not bool((evals > 0).all()):
                continue
            out = (evecs * evals.pow(-1.0 / root)) @ evecs.transpose(-1, -2)
            if torch.isfinite(out).all():
                return out.to(torch.float32)
        except (RuntimeError, torch.linalg.LinAlgError):
            continue
    return None


def matrix_power_psd(mat: torch.Tensor, power: float, damping: float = 0.0) -> torch.Tensor:
    """(mat + damping I)^power in float64, for diagnostics and references (may raise)."""
    m = _symmetrize(mat.double())
    evals, evecs = torch.linalg.eigh(m)
    evals = evals.clamp_min(0.0) + damping
    return (evecs * evals.pow(power)) @ evecs.T
