"""PSGD-Kron for one matrix block: P = (Ql^T Ql) (x) (Qr^T Qr), Q fitted iteratively (Li, 2018/2024).

This is the comparison baseline of the research: its curvature is *estimated* by a few stochastic
fitting iterations per step rather than computed, so its quality depends on the iteration count,
not on the batch size. Pairs are gradient-whitening pairs (v ~ N(0, I), h = g), which need no
Hessian-vector product and so work inside any engine; the fixed point is P ~ (E[g g^T])^(-1/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def _init(self, grad: torch.Tensor) -> None:
        scale = self.init_scale * float(grad.pow(2).mean() + 1e-30) ** (-1.0 / 8.0)
        self.ql = scale * torch.eye(self.rows, device=grad.device)
        self.qr = scale * torch.eye(self.cols, device=grad.device)

    def fit(self, grad: torch.Tensor, damping: float, iterations: int = 1, generator=None) -> bool:
        """Run ``iterations`` stochastic fitting steps of Q on whitening pairs (v, g)."""
        g = grad.float()
        if not torch.isfinite(g).all():
            return False
        if self.ql is None:
            self._init(g)
        for _ in range(iterations):
            noise = torch.randn(g.shape, generator=generator, device="cpu").to(g.device)
            h = g + (damping**0.5) * g.abs().mean() * noise
            v = torch.randn(g.shape, generator=generator, device="cpu").to(g.device)
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

    @property
    def ready(self) -> bool:
        return self.ql is not None

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        assert self.ql is not None and self.qr is not None
        return self.ql.T @ (self.ql @ grad.float() @ self.qr.T) @ self.qr

    def inverse_apply(self, vec: torch.Tensor, damping: float) -> torch.Tensor:
        """Apply P^-1 = (Ql^T Ql)^-1 (x) (Qr^T Qr)^-1, for quality diagnostics."""
        pl = self.ql.T.double() @ self.ql.double()
        pr = self.qr.T.double() @ self.qr.double()
        out = torch.linalg.solve(pl, vec.double())
        return torch.linalg.solve(pr, out.T).T.float()

    def state_dict(self) -> dict:
        return {"ql": self.ql, "qr": self.qr}

    def load_state_dict(self, state: dict) -> None:
        self.ql = None if state.get("ql") is None else state["ql"].float().clone()
        self.qr = None if state.get("qr") is None else state["qr"].float().clone()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ql, self.qr) if t is not None)
