"""PSGD-Kron for one matrix block: P = (Ql^T Ql) (x) (Qr^T Qr), Q fitted iteratively (Li, 2018/2024).

This is the comparison baseline of the research: its curvature is *estimated* by a few stochastic
fitting iterations per step rather than computed, so its quality depends on the iteration count,
not on the batch size. Pairs are gradient-whitening pairs (v ~ N(0, I), h = g), which need no
Hessian-vector product and so work inside any engine; the fixed point is P ~ (E[g g^T])^(-1/2).

An order-1 tensor (``diagonal=True``; a bias, a LayerNorm gain) gets a diagonal Q instead, a vector q
with P = q*q, as Li's Kron does for such dimensions: an n x n triangular Q of a bias would cost
O(n^2) memory for a preconditioner that the whitening criterion fits per coordinate anyway. Its
update is the dense one restricted to diagonal matrices: with a = q*h and b = v/q,
q <- q - lr (a*a - b*b) q / max|a*a + b*b|. O(n) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_soo.curvature.precision import as_state
from ds_soo.curvature.state import check_shapes


def _norm_lower_bound(mat: torch.Tensor) -> torch.Tensor:
    """A cheap lower bound on the spectral norm: the largest row 2-norm."""
    return mat.norm(dim=1).max()


@dataclass
class PSGDKronBlock:
    rows: int
    cols: int
    precond_lr: float = 0.1
    init_scale: float = 1.0
    ql: torch.Tensor | None = None
    qr: torch.Tensor | None = None
    diagonal: bool = False
    q: torch.Tensor | None = None  # the diagonal case's Q, a vector of rows * cols entries

    def _init(self, grad: torch.Tensor) -> None:
        scale = self.init_scale * float(grad.pow(2).mean() + 1e-30) ** (-1.0 / 8.0)
        if self.diagonal:
            # Q = Ql (x) Qr of the dense start, so that P starts at the same scale either way.
            self.q = torch.full((grad.numel(),), scale * scale, dtype=grad.dtype, device=grad.device)
            return
        self.ql = scale * torch.eye(self.rows, dtype=grad.dtype, device=grad.device)
        self.qr = scale * torch.eye(self.cols, dtype=grad.dtype, device=grad.device)

    def fit(self, grad: torch.Tensor, damping: float, iterations: int = 1, generator=None) -> bool:
        """Run ``iterations`` stochastic fitting steps of Q on whitening pairs (v, g)."""
        g = grad.to(self._dtype()) if self.ready else as_state(grad)
        if not torch.isfinite(g).all():
            return False
        if not self.ready:
            self._init(g)
        for _ in range(iterations):
            # Probes drawn in fp32 whatever the state dtype, so that a float64 run sees the same probes.
            noise = torch.randn(g.shape, generator=generator, device="cpu").to(g.device, g.dtype)
            h = g + (damping**0.5) * g.abs().mean() * noise
            v = torch.randn(g.shape, generator=generator, device="cpu").to(g.device, g.dtype)
            if not (self._fit_diagonal(h, v) if self.diagonal else self._fit_dense(h, v)):
                return False
        return True

    def _fit_dense(self, h: torch.Tensor, v: torch.Tensor) -> bool:
        ql, qr = self.ql, self.qr
        a = ql @ h @ qr.T
        # conj_b = Ql^-T v Qr^-1, by triangular solves.
        conj_b = torch.linalg.solve_triangular(qr, v, upper=True, left=False)
        conj_b = torch.linalg.solve_triangular(ql.T, conj_b, upper=False)
        term_l, term_l2 = a @ a.T, conj_b @ conj_b.T
        term_r, term_r2 = a.T @ a, conj_b.T @ conj_b
        new_ql = ql - self.precond_lr / _norm_lower_bound(term_l + term_l2) * torch.triu(term_l - term_l2) @ ql
        new_qr = qr - self.precond_lr / _norm_lower_bound(term_r + term_r2) * torch.triu(term_r - term_r2) @ qr
        if not (torch.isfinite(new_ql).all() and torch.isfinite(new_qr).all()):
            return False
        self.ql, self.qr = new_ql, new_qr
        return True

    def _fit_diagonal(self, h: torch.Tensor, v: torch.Tensor) -> bool:
        q = self.q
        a_sq, b_sq = (q * h.reshape(-1)).square(), (v.reshape(-1) / q).square()
        # The spectral norm of a diagonal matrix is its largest |entry|: exact, not a lower bound.
        new_q = q - self.precond_lr / (a_sq + b_sq).max() * (a_sq - b_sq) * q
        if not torch.isfinite(new_q).all():
            return False
        self.q = new_q
        return True

    @property
    def ready(self) -> bool:
        return (self.q if self.diagonal else self.ql) is not None

    def _dtype(self) -> torch.dtype:
        """The dtype Q is kept in (set by the first fit from the gradient's state dtype)."""
        return (self.q if self.diagonal else self.ql).dtype

    def root_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of Q's factors (for copying them between ranks before they exist here)."""
        if self.diagonal:
            return {"q": (self.rows * self.cols,)}
        return {"ql": (self.rows, self.rows), "qr": (self.cols, self.cols)}

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        g = grad.to(self._dtype())
        if self.diagonal:
            return (self.q.square() * g.reshape(-1)).view_as(g)
        assert self.ql is not None and self.qr is not None
        return self.ql.T @ (self.ql @ g @ self.qr.T) @ self.qr

    def inverse_apply(self, vec: torch.Tensor, damping: float) -> torch.Tensor:
        """Apply P^-1 = (Ql^T Ql)^-1 (x) (Qr^T Qr)^-1, for quality diagnostics."""
        if self.diagonal:
            return (vec.double().reshape(-1) / self.q.double().square()).view_as(vec).to(self.q.dtype)
        pl = self.ql.T.double() @ self.ql.double()
        pr = self.qr.T.double() @ self.qr.double()
        out = torch.linalg.solve(pl, vec.double())
        return torch.linalg.solve(pr, out.T).T.to(self.ql.dtype)

    def state_dict(self) -> dict:
        return {"q": self.q} if self.diagonal else {"ql": self.ql, "qr": self.qr}

    def load_state_dict(self, state: dict) -> None:
        """Raise ValueError (changing nothing) for state of another layout (dense/diagonal Q) or shape."""
        keys = set(self.state_dict())
        if not keys <= set(state) and set(state) & {"q", "ql", "qr"}:
            kind, other = ("diagonal", "dense") if self.diagonal else ("dense", "diagonal")
            raise ValueError(f"PSGD state of a {other} Q ({sorted(state)}) cannot load into a {kind} block")
        check_shapes(state, self.root_shapes())
        for key in keys:
            setattr(self, key, None if state.get(key) is None else as_state(state[key]).clone())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ql, self.qr, self.q) if t is not None)
