"""K-FAC for one layer: C = (G + rho_G I) (x) (A + rho_A I), update = (G+rho_G)^-1 dW (A+rho_A)^-1.

``A = E[h h^T]`` over layer inputs (bias folded in as a constant-one column) and ``G = E[d d^T]`` over
gradients of the loss w.r.t. the layer outputs, both kept as exponential moving averages in the state
dtype (``precision.state_dtype``: float64 for a float64 model, else fp32).
The gradient matrix is ``[dW | db]`` of shape (out, in [+1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ds_soo.curvature.batched_refresh import INVERSE, Request, solve_each
from ds_soo.curvature.precision import as_state


def split_damping(
    a: torch.Tensor,
    g: torch.Tensor,
    damping: float,
    pi_correction: bool,
    traces: tuple[float, float] | None = None,
    relative: bool = False,
) -> tuple[float, float]:
    """Split rho between the two factors (Martens & Grosse 2015, section 6.3).

    With pi-correction, rho_A = pi sqrt(rho) and rho_G = sqrt(rho) / pi where
    pi^2 = (tr A / dim A) / (tr G / dim G); without it both get sqrt(rho). ``traces`` (tr A, tr G), when
    the caller has already read them to the host (several blocks in one read), saves reading them here.

    ``relative``: rho is a fraction of the factors' mean eigenvalues, rho_A = sqrt(rho) tr A / dim A and
    rho_G = sqrt(rho) tr G / dim G, i.e. the pi-split of rho (tr A / dim A)(tr G / dim G); a factor with
    no positive finite trace (an unused layer) keeps the absolute split.
    """
    root = math.sqrt(damping)
    if not pi_correction and not relative:
        return root, root
    tr_a, tr_g = traces if traces is not None else (float(torch.trace(a)), float(torch.trace(g)))
    mean_a = tr_a / a.shape[0]
    mean_g = tr_g / g.shape[0]
    if mean_a <= 0 or mean_g <= 0 or not math.isfinite(mean_a) or not math.isfinite(mean_g):
        return root, root
    if relative:
        return root * mean_a, root * mean_g
    pi = math.sqrt(mean_a / mean_g)
    return pi * root, root / pi


@dataclass
class KFACBlock:
    """Running factors and their damped inverses for one layer. Knows nothing of ranks."""

    in_dim: int
    out_dim: int
    ema_decay: float = 0.95
    pi_correction: bool = True
    relative_damping: bool = False
    a: torch.Tensor | None = None
    g: torch.Tensor | None = None
    a_inv: torch.Tensor | None = None
    g_inv: torch.Tensor | None = None

    def update_factors(
        self, a_new: torch.Tensor | None, g_new: torch.Tensor | None, active: torch.Tensor | None = None
    ) -> list[str]:
        """Fold one optimizer step's factor estimates into the running averages (None: no data).

        ``active`` (a 0-d bool tensor) applies the update only where it is true, decided on the device
        so that the step needs no host synchronisation; a factor created here while the decision is
        pending is listed in the return value, for the caller to reset to None if it turns out false.
        """
        created = []
        for key, new in (("a", a_new), ("g", g_new)):
            if new is not None and getattr(self, key) is None:
                created.append(key)
            setattr(self, key, self._ema(getattr(self, key), new, active))
        return created

    def _ema(
        self, old: torch.Tensor | None, new: torch.Tensor | None, active: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if new is None:
            return old
        new = as_state(new)
        if old is None:
            return new.clone()
        if active is None:
            return old.mul_(self.ema_decay).add_(new, alpha=1.0 - self.ema_decay)
        return old.copy_(torch.where(active, old.mul(self.ema_decay).add_(new, alpha=1.0 - self.ema_decay), old))

    def refresh_scalars(self) -> list[torch.Tensor]:
        """The device scalars ``refresh_requests`` needs on the host (tr A, tr G for the pi-split), so that a
        refresh of many blocks reads them all at once."""
        if self.a is None or self.g is None or not (self.pi_correction or self.relative_damping):
            return []
        return [torch.trace(self.a), torch.trace(self.g)]

    def refresh_requests(self, damping: float, scalars: list[float] | None = None) -> list[Request]:
        """The two factors to invert, each with its share of the damping (none before both exist).

        ``scalars``: ``refresh_scalars()`` already read to the host (else they are read here)."""
        if self.a is None or self.g is None:
            return []
        traces = (scalars[0], scalars[1]) if scalars else None
        rho_a, rho_g = split_damping(self.a, self.g, damping, self.pi_correction, traces, self.relative_damping)
        return [Request("a_inv", self.a, INVERSE, rho_a), Request("g_inv", self.g, INVERSE, rho_g)]

    def commit_refresh(self, results: dict[str, torch.Tensor | None]) -> bool:
        """Take the new pair if both inverses exist; otherwise keep the previous pair and return False."""
        a_inv, g_inv = results.get("a_inv"), results.get("g_inv")
        if a_inv is None or g_inv is None:
            return False
        self.a_inv, self.g_inv = a_inv, g_inv
        return True

    def refresh(self, damping: float, dtype: torch.dtype = torch.float32, retry_float64: bool = True) -> bool:
        """Recompute both damped inverses. On failure keep the previous pair and return False."""
        return self.commit_refresh(solve_each(self.refresh_requests(damping), dtype, retry_float64))

    @property
    def ready(self) -> bool:
        return self.a_inv is not None and self.g_inv is not None

    def root_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the two inverses (for copying them between ranks before they exist here)."""
        return {"g_inv": (self.out_dim, self.out_dim), "a_inv": (self.in_dim, self.in_dim)}

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """(G + rho_G I)^-1 grad (A + rho_A I)^-1 for grad of shape (out, in [+1])."""
        assert self.g_inv is not None and self.a_inv is not None
        return self.g_inv @ grad.to(self.g_inv.dtype) @ self.a_inv

    def curvature_form(self, delta: torch.Tensor) -> torch.Tensor:
        """<delta, G delta A>: the undamped K-FAC quadratic form vec(delta)^T (A (x) G) vec(delta), a 0-d
        tensor; the Levenberg-Marquardt rule's model of the loss change needs it (0 before both factors exist)."""
        if self.a is None or self.g is None:
            return torch.zeros((), dtype=delta.dtype, device=delta.device)
        d = delta.to(self.g.dtype)
        return (d * (self.g @ d @ self.a)).sum()

    def inverse_apply(self, vec: torch.Tensor, damping: float) -> torch.Tensor:
        """Apply the damped curvature itself, (G + rho_G) vec (A + rho_A), for quality diagnostics."""
        assert self.a is not None and self.g is not None
        rho_a, rho_g = split_damping(self.a, self.g, damping, self.pi_correction, relative=self.relative_damping)
        eye_a = torch.eye(self.a.shape[0], dtype=self.a.dtype, device=self.a.device)
        eye_g = torch.eye(self.g.shape[0], dtype=self.g.dtype, device=self.g.device)
        return (self.g + rho_g * eye_g) @ vec.to(self.g.dtype) @ (self.a + rho_a * eye_a)

    def state_dict(self) -> dict:
        return {"a": self.a, "g": self.g, "a_inv": self.a_inv, "g_inv": self.g_inv}

    def load_state_dict(self, state: dict) -> None:
        for key in ("a", "g", "a_inv", "g_inv"):
            setattr(self, key, None if state.get(key) is None else as_state(state[key]).clone())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.g, self.a_inv, self.g_inv) if t is not None)
