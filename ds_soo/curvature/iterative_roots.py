"""Inverse p-th roots (A + eps I)^(-1/p) by the coupled Newton iteration: matmuls only, batched.

Why: ``eigh`` is a sequential LAPACK/cuSOLVER call per matrix and on GPUs is slow next to a handful
of batched matmuls; the coupled Newton iteration (Guo & Higham, SIAM J. Matrix Anal. Appl. 28(3),
2006; the form used by the Shampoo implementations of Anil et al.) needs only matrix products, so a
stack of equal-shaped statistics is one batched kernel per product.

For SPD ``A`` scaled by ``z`` so that its eigenvalues lie in (0, (p+1)/2], with ``X_0 = z^(1/p) I``
and ``M_0 = z A``:

    T_k = ((p+1) I - M_k) / p,    X_{k+1} = X_k T_k,    M_{k+1} = T_k^p M_k.

All iterates are polynomials in ``A`` and keep ``M_k = X_k^p A``, so ``M_k -> I`` means
``X_k -> A^(-1/p)`` (relative error of ``X`` about ``||M - I|| / p``). Each eigenvalue of ``M``
moves towards 1 monotonically: small ones grow by about ((p+1)/p)^p per step (2.4x for p = 4), then
convergence is quadratic; so the iteration count grows with log(condition number).

No host synchronisation inside the loop: every matrix of the stack runs the same number of steps
(fixed, or ``auto_iters``: predicted from the damping, one host read before the loop), and one that
stops improving (it reached the round-off floor, or diverges on an indefinite or non-finite input)
is frozen with ``torch.where`` at its best iterate; it counts as converged when ||M - I||_F <= tol
there. Callers read the ``ok`` mask once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

AUTO_MAX_ITERS = 100  # the "auto" count's cap, and the count when the damping gives no bound


class NewtonRoot(NamedTuple):
    root: torch.Tensor  # (..., n, n), the input's dtype of computation
    ok: torch.Tensor  # (...,) bool: converged to ``tol`` and finite
    iters: torch.Tensor  # (...,) int: accepted iterations per matrix
    error: torch.Tensor  # (...,) ||M - I||_F at the returned iterate


def _matpow(t: torch.Tensor, p: int) -> torch.Tensor:
    """t^p by repeated squaring (ceil(log2 p) + popcount - 1 products)."""
    out = None
    while p:
        if p & 1:
            out = t if out is None else out @ t
        p >>= 1
        if p:
            t = t @ t
    assert out is not None
    return out


def eigenvalue_upper_bound(mat: torch.Tensor) -> torch.Tensor:
    """min(||A||_F, ||A||_inf) per matrix: both bound the spectral radius of a symmetric matrix.

    A rigorous bound (not a power-iteration estimate, which can fall short) keeps the scaled
    eigenvalues below (p+1)/2, inside the iteration's region of convergence (0, p+1).
    """
    fro = torch.linalg.matrix_norm(mat, "fro")
    inf = mat.abs().sum(-1).amax(-1)
    return torch.minimum(fro, inf)


def auto_iters(root: int, lower_over_upper: float) -> int:
    """Iterations that bring an eigenvalue from the bottom of the spectrum to the fp32 round-off floor.

    ``lower_over_upper``: a lower bound on the smallest eigenvalue (the damping, for a PSD statistic)
    over the upper bound used for scaling. The smallest scaled eigenvalue m0 = (p+1)/2 * that ratio
    grows by ((p+1)/p)^p per step while small; measured on rank-deficient statistics (n 16..512,
    damping 1e-2..1e-6 of the top eigenvalue, p 1, 2, 4) the steps accepted exceed that log count by
    4.5..5.6 (the approach to 1 and the quadratic phase; fp64 as well), so 7 more cover it plus the
    final rejected step.
    """
    if not math.isfinite(lower_over_upper) or lower_over_upper <= 0:
        return AUTO_MAX_ITERS
    m0 = min(1.0, 0.5 * (root + 1) * lower_over_upper)
    linear = math.log(1.0 / m0) / (root * math.log((root + 1) / root))
    return min(AUTO_MAX_ITERS, math.ceil(linear) + 7)


def default_tol(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Threshold on ||M - I||_F for "converged": 100 ulps times sqrt(n).

    The round-off floor measured in fp32 is about one ulp times sqrt(n), so this leaves a wide margin
    while bounding the relative error of the root that is due to stopping early by about tol / p.
    """
    return 100.0 * torch.finfo(dtype).eps * max(n, 1) ** 0.5


def coupled_newton_inverse_root(
    mat: torch.Tensor,
    root: int,
    damping: float | torch.Tensor = 0.0,
    *,
    max_iters: int | None = None,
    tol: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> NewtonRoot:
    """(mat + damping I)^(-1/root) for a symmetric PSD ``mat`` of shape (..., n, n).

    ``damping``: a float, or a tensor of shape (...) with one damping per matrix. ``ok`` says
    ||M - I||_F <= ``tol`` (default ``default_tol(n)``) and the root is finite. ``max_iters=None``
    runs ``auto_iters`` steps for the worst matrix of the stack (one host read of damping / bound).
    """
    if root < 1:
        raise ValueError(f"root must be a positive integer, got {root}")
    n = mat.shape[-1]
    if mat.dim() < 2 or mat.shape[-2] != n:
        raise ValueError(f"expected (..., n, n), got {tuple(mat.shape)}")
    tol = default_tol(n, dtype) if tol is None else tol
    a = mat.to(dtype)
    a = 0.5 * (a + a.transpose(-1, -2))
    eye = torch.eye(n, dtype=dtype, device=a.device)
    eps = torch.as_tensor(damping, dtype=dtype, device=a.device)
    a = a + eps[..., None, None] * eye

    z = (root + 1) / (2.0 * eigenvalue_upper_bound(a))
    if max_iters is None:
        max_iters = auto_iters(root, float((eps.expand(z.shape) * z * 2.0 / (root + 1)).amin()))
    m = a * z[..., None, None]
    x = eye * z.pow(1.0 / root)[..., None, None]
    err = torch.linalg.matrix_norm(m - eye, "fro")
    active = torch.isfinite(err)
    iters = torch.zeros(err.shape, dtype=torch.int32, device=a.device)
    for _ in range(max_iters):
        t = ((root + 1) * eye - m) / root
        x_new = x @ t
        m_new = _matpow(t, root) @ m
        err_new = torch.linalg.matrix_norm(m_new - eye, "fro")
        accept = active & (err_new < err)  # NaN compares false: a blown-up step is never taken
        x = torch.where(accept[..., None, None], x_new, x)
        m = torch.where(accept[..., None, None], m_new, m)
        err = torch.where(accept, err_new, err)
        iters += accept.to(torch.int32)
        active = accept  # run on to the round-off floor: the last steps cost little and gain accuracy
    x = 0.5 * (x + x.transpose(-1, -2))
    ok = (err <= tol) & torch.isfinite(x).all(-1).all(-1)
    return NewtonRoot(x, ok, iters, err)
