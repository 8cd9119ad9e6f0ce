"""Shampoo for one matrix block: L = sum G G^T, R = sum G^T G, update L^(-1/p) G R^(-1/p).

The direction is grafted onto the norm of a first-order update (Adam's diagonal or plain SGD), so
that the learning rate tuned for a first-order run carries over.

An order-1 tensor (``diagonal=True``; a bias, a LayerNorm gain) keeps diagonal statistics instead of
an n x n factor, as Meta's Distributed Shampoo does: D = sum g*g and the direction (D + eps)^(-2/p) g
(Adagrad's -1/2 for the default p = 4: an order-k tensor's root is 1/(2k)). O(n) memory.

With ``packed`` (the default) L and R are kept as their packed upper triangles (``packed.py``): half the
memory of dense factors, unpacked only when a refresh factorises them. The roots stay dense, since
every step multiplies by them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_soo.curvature.batched_refresh import DIAGONAL, ROOT, Request, solve_each
from ds_soo.curvature.packed import pack_upper, packed_size, unpack_upper
from ds_soo.curvature.precision import as_state
from ds_soo.curvature.state import check_shapes


@dataclass
class ShampooBlock:
    rows: int
    cols: int
    beta2: float = 1.0
    exponent: int = 4
    grafting: str = "adam"
    graft_beta2: float = 0.999
    graft_epsilon: float = 1e-8
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    left_root: torch.Tensor | None = None
    right_root: torch.Tensor | None = None
    graft_v: torch.Tensor | None = None
    graft_steps: int = 0
    diagonal: bool = False
    root_method: str = "eigh"  # "eigh" | "newton" (linalg.inverse_root)
    packed: bool = True  # L and R stored as packed upper triangles (dense blocks only)
    relative_damping: bool = False  # epsilon as a fraction of each factor's mean eigenvalue (tr / dim)

    def update_stats(self, grad: torch.Tensor, active: torch.Tensor | None = None) -> bool:
        """Accumulate the statistics; True if this call created them (they were None before).

        ``active`` (a 0-d bool tensor) applies the update only where it is true, decided on the device;
        the caller resets statistics created under a pending decision that turns out false.
        """
        g = as_state(grad)
        created = self.left is None
        if self.diagonal:
            sq = g.reshape(-1).square()
            if self.left is None:
                self.left = torch.zeros_like(sq)
            self.left = self._accumulate(self.left, sq, active)
            return created
        gg_t, gt_g = g @ g.T, g.T @ g
        if self.packed:
            gg_t, gt_g = pack_upper(gg_t), pack_upper(gt_g)
        if self.left is None:
            self.left, self.right = torch.zeros_like(gg_t), torch.zeros_like(gt_g)
        self.left = self._accumulate(self.left, gg_t, active)
        self.right = self._accumulate(self.right, gt_g, active)
        return created

    def _accumulate(self, stat: torch.Tensor, new: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        if active is None:
            return stat.mul_(self.beta2).add_(new, alpha=1 - self.beta2) if self.beta2 < 1.0 else stat.add_(new)
        updated = stat.mul(self.beta2).add_(new, alpha=1 - self.beta2) if self.beta2 < 1.0 else stat.add(new)
        return stat.copy_(torch.where(active, updated, stat))

    def left_matrix(self) -> torch.Tensor | None:
        """L as a dense (rows, rows) matrix (the diagonal statistics D as they are)."""
        return unpack_upper(self.left) if self._is_packed(self.left) else self.left

    def right_matrix(self) -> torch.Tensor | None:
        """R as a dense (cols, cols) matrix (None for a diagonal block)."""
        return unpack_upper(self.right) if self._is_packed(self.right) else self.right

    def _is_packed(self, stat: torch.Tensor | None) -> bool:
        return stat is not None and not self.diagonal and stat.dim() == 1

    def refresh_scalars(self) -> list[torch.Tensor]:
        """The factors' mean eigenvalues when the damping is relative to them (else nothing to read;
        see ``KFACBlock.refresh_scalars``)."""
        if not self.relative_damping or self.left is None:
            return []
        if self.diagonal:
            return [self.left.mean()]
        return [torch.diagonal(self.left_matrix()).mean(), torch.diagonal(self.right_matrix()).mean()]

    def refresh_requests(self, damping: float, scalars: list[float] | None = None) -> list[Request]:
        """The statistics to invert (none before they exist): L and R, or the diagonal D."""
        if self.left is None:
            return []
        eps = self._epsilons(damping, scalars)
        if self.diagonal:
            # (D + eps)^(-2/p): the elementwise root 1/(p/2).
            return [Request("left_root", self.left, DIAGONAL, eps[0], self.exponent / 2)]
        return [
            Request("left_root", self.left_matrix(), ROOT, eps[0], self.exponent, self.root_method),
            Request("right_root", self.right_matrix(), ROOT, eps[1], self.exponent, self.root_method),
        ]

    def _epsilons(self, damping: float, scalars: list[float] | None = None) -> list[float]:
        """Each factor's epsilon: ``damping``, or with ``relative_damping`` that fraction of its mean eigenvalue."""
        if not self.relative_damping:
            return [damping, damping]
        means = scalars if scalars else [float(x) for x in self.refresh_scalars()]
        # A factor of zeros (a block that never got a gradient) keeps the absolute epsilon.
        eps = [damping * m if 0 < m < float("inf") else damping for m in means]
        return eps + eps[:1] if len(eps) == 1 else eps

    def commit_refresh(self, results: dict[str, torch.Tensor | None]) -> bool:
        """Take the new roots if all exist; otherwise keep the previous pair and return False."""
        left, right = results.get("left_root"), results.get("right_root")
        if self.diagonal and left is not None:
            right = torch.ones(1, 1, dtype=left.dtype, device=left.device)
        if left is None or right is None:
            return False
        self.left_root, self.right_root = left, right
        return True

    def refresh(self, damping: float, dtype: torch.dtype = torch.float32, retry_float64: bool = True) -> bool:
        """Recompute both inverse roots; on failure keep the previous pair and return False."""
        return self.commit_refresh(solve_each(self.refresh_requests(damping), dtype, retry_float64))

    @property
    def ready(self) -> bool:
        return self.left_root is not None and self.right_root is not None

    def root_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the two roots (for copying them between ranks before they exist here)."""
        if self.diagonal:
            return {"left_root": (self.rows,), "right_root": (1, 1)}
        return {"left_root": (self.rows, self.rows), "right_root": (self.cols, self.cols)}

    def raw_direction(self, grad: torch.Tensor) -> torch.Tensor:
        assert self.left_root is not None and self.right_root is not None
        if self.diagonal:
            return self.left_root.view(-1, 1) * grad.to(self.left_root.dtype)
        return self.left_root @ grad.to(self.left_root.dtype) @ self.right_root

    def graft_direction(self, grad: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """First-order direction whose norm the Shampoo direction inherits (updates Adam's state).

        With ``active`` (a 0-d bool tensor) Adam's state changes only where it is true; the caller
        undoes the step count with ``undo_graft_step`` when it turns out false.
        """
        g = as_state(grad)
        if self.grafting == "adam":
            if self.graft_v is None:
                self.graft_v = torch.zeros_like(g)
            self.graft_steps += 1
            if active is None:
                new_v = self.graft_v.mul_(self.graft_beta2).addcmul_(g, g, value=1 - self.graft_beta2)
            else:
                new_v = self.graft_v.mul(self.graft_beta2).addcmul_(g, g, value=1 - self.graft_beta2)
                self.graft_v.copy_(torch.where(active, new_v, self.graft_v))
            v_hat = new_v / (1 - self.graft_beta2**self.graft_steps)
            return g / (v_hat.sqrt() + self.graft_epsilon)
        return g

    def undo_graft_step(self) -> None:
        """Forget one masked-off ``graft_direction`` call (its state update was not applied)."""
        if self.grafting == "adam" and self.graft_steps > 0:
            self.graft_steps -= 1
            if self.graft_steps == 0:
                self.graft_v = None

    def precondition(self, grad: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        direction = self.raw_direction(grad)
        if self.grafting == "none":
            return direction
        graft = self.graft_direction(grad, active)
        norm = direction.norm()
        # A zero direction stays zero; decided on the device (no host synchronisation).
        return direction * torch.where(norm == 0, torch.ones_like(norm), graft.norm() / norm)

    def inverse_apply(self, vec: torch.Tensor, damping: float) -> torch.Tensor:
        """Apply P^-1 = L^(1/p) (x) R^(1/p) (ungrafted), for quality diagnostics."""
        from ds_soo.curvature.linalg import matrix_power_psd

        eps = self._epsilons(damping)
        if self.diagonal:
            d = (self.left.double().clamp_min(0.0) + eps[0]).pow(2.0 / self.exponent).to(self.left.dtype)
            return d.view(-1, 1) * vec.to(self.left.dtype)
        lp = matrix_power_psd(self.left_matrix(), 1.0 / self.exponent, eps[0]).to(self.left.dtype)
        rp = matrix_power_psd(self.right_matrix(), 1.0 / self.exponent, eps[1]).to(self.left.dtype)
        return lp @ vec.to(self.left.dtype) @ rp

    def state_dict(self) -> dict:
        """Statistics as stored (packed or dense); ``load_state_dict`` takes either form."""
        keys = ("left", "right", "left_root", "right_root", "graft_v")
        return {k: getattr(self, k) for k in keys} | {"graft_steps": self.graft_steps}

    def load_state_dict(self, state: dict) -> None:
        """Raise ValueError (changing nothing) for state of another block shape or layout.

        Statistics saved dense load into a packed block and the other way round, so that a checkpoint
        survives a change of ``pack_statistics``."""
        roots = self.root_shapes()
        stats = {"left": self._saved_shape(self.rows, state.get("left"))}
        if not self.diagonal:
            stats["right"] = self._saved_shape(self.cols, state.get("right"))
        check_shapes(state, roots | stats | {"graft_v": (self.rows, self.cols)})
        state = {**state, **{k: self._stored_form(state.get(k)) for k in ("left", "right")}}
        for key in ("left", "right", "left_root", "right_root", "graft_v"):
            setattr(self, key, None if state.get(key) is None else as_state(state[key]).clone())
        self.graft_steps = int(state.get("graft_steps", 0))

    def _saved_shape(self, n: int, stat: object) -> tuple[int, ...]:
        """The shape a saved statistic of an n-sided factor must have: packed if saved packed, else dense."""
        if self.diagonal:
            return (n,)
        return (packed_size(n),) if isinstance(stat, torch.Tensor) and stat.dim() == 1 else (n, n)

    def _stored_form(self, stat: object) -> object:
        """A saved (shape-checked) dense or packed statistic in this block's form."""
        if not isinstance(stat, torch.Tensor) or self.diagonal:
            return stat
        if self.packed and stat.dim() == 2:
            return pack_upper(0.5 * (stat + stat.T))  # what a refresh of the dense statistic factorises
        if not self.packed and stat.dim() == 1:
            return unpack_upper(stat)
        return stat

    def nbytes(self) -> int:
        ts = (self.left, self.right, self.left_root, self.right_root, self.graft_v)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)
