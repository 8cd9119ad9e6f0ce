"""``damping.kind: adaptive``: the quadratic model's terms for a step, measured on every engine.

On an adaptation step the preconditioner keeps, for the range of each parameter its rank holds, the
raw averaged gradient and the weights before the base optimizer moves them. When the caller reports
the loss on the same batch before and after that step (``Preconditioner.damping_feedback``), the
actual step ``delta`` (momentum, weight decay and all) is the weights' change, and

- ``g^T delta`` and ``|delta|^2`` are sums over the range each rank *provides* (every element once);
- ``delta^T C delta`` is summed by each block's owner from its K-FAC factors, after ``delta`` is
  gathered there the way gradients are;

one all-reduce of four numbers, and one host read, give the same reduction ratio on every rank, so
the damping moves identically everywhere. Steps without an adaptation cost nothing.

The gradient and weights are one extra copy each of the held parameters, only from an adaptation
step to its feedback. Parameters that K-FAC does not precondition enter the model through
``g^T delta`` and the damping term only (no curvature for them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ds_soo.config import ConfigError
from ds_soo.curvature.levenberg_marquardt import LevenbergMarquardt, model_change, reduction_ratio
from ds_soo.curvature.precision import as_state


@dataclass
class _Snapshot:
    step: int
    damping: float
    grads: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]


class AdaptiveDamping:
    """The Levenberg-Marquardt state plus the one snapshot pending between a step and its feedback."""

    def __init__(self, rule: LevenbergMarquardt):
        self.rule = rule
        self.pending: _Snapshot | None = None
        self.last_terms: dict[str, float] | None = None

    def due(self, step: int) -> bool:
        return self.rule.due(step)

    def check_no_pending(self) -> None:
        """Refuse a new step while the previous adaptation still waits: the damping would silently stay put."""
        if self.pending is not None:
            raise ConfigError(
                f"ds_soo.damping.kind is 'adaptive' but no loss feedback followed optimizer step {self.pending.step}: "
                "after the base optimizer's step, when Preconditioner.wants_damping_feedback is true, call "
                "Preconditioner.damping_feedback(loss_before, loss_after) with the loss on the same batch "
                "(SecondOrderOptimizer.step(closure) and the ds_soo trainer do), or set damping.kind to 'constant'"
            )

    def snapshot(self, step: int, damping: float, access: Any, layouts: dict[str, Any]) -> _Snapshot:
        """The raw gradient (loss scale removed) and the weights, before anything writes to either.

        Every trainable parameter's weights: one without a gradient this step (an unused layer) can
        still move through momentum, and its step belongs in the model (with no first-order term)."""
        scale = access.grad_scale()
        grads, params = {}, {}
        for name in layouts:
            p = access.local_param(name)
            if p is None:
                raise NotImplementedError(f"{name}: this engine adapter cannot read the weights it holds")
            if p.numel() == 0:
                continue
            params[name] = as_state(p.detach()).reshape(-1).clone()
            g = access.local_grad(name)
            if g is not None:
                grads[name] = as_state(g.detach()).reshape(-1) / scale
        return _Snapshot(step, damping, grads, params)

    def feedback(self, pre: Any, loss_before: float | torch.Tensor, loss_after: float | torch.Tensor) -> float | None:
        """Measure the step's reduction ratio and move the damping; returns the ratio (None: no decision)."""
        snap, self.pending = self.pending, None
        if snap is None:
            raise RuntimeError("damping_feedback called with no adaptation pending (see wants_damping_feedback)")
        deltas: dict[str, torch.Tensor] = {}
        dtype = pre.state_dtype
        device = pre._device()
        g_dot = torch.zeros((), dtype=dtype, device=device)
        d_sq = torch.zeros((), dtype=dtype, device=device)
        for name, before in snap.params.items():
            now = as_state(pre.access.local_param(name).detach()).reshape(-1)
            delta = now.to(before.dtype) - before
            deltas[name] = delta
            lay = pre.layouts[name]
            (ps, pe), (hs, _) = lay.provided[pre.rank], lay.held[pre.rank]
            if pe > ps:
                d = delta[ps - hs : pe - hs]
                d_sq = d_sq + d.square().sum().to(device, dtype)
                if name in snap.grads:
                    g_dot = g_dot + (snap.grads[name][ps - hs : pe - hs] * d).sum().to(device, dtype)
        # The exchange returns the blocks this rank owns (all of them in one process): each counted once.
        vecs = pre.exchange.gather_blocks(pre.block_index, pre.owner_of, read=deltas.get)
        by_id = {b.block_id: b for b in pre.blocks}
        curv = torch.zeros((), dtype=dtype, device=device)
        for bid, vec in vecs.items():
            state = pre.states.get(bid)
            if vec is None or state is None:
                continue
            curv = curv + state.curvature_form(by_id[bid].to_matrix(as_state(vec))).to(device, dtype)
        observed = torch.as_tensor(loss_after, dtype=dtype).detach().to(device) - torch.as_tensor(
            loss_before, dtype=dtype
        ).detach().to(device)
        terms = pre.exchange.all_sum(torch.stack([observed, g_dot, curv, d_sq]).reshape(4))
        obs, gd, cv, dd = terms.tolist()  # the adaptation's one host read
        obs /= pre.world_size  # each rank reported its own share of the batch: the mean of their changes
        predicted = model_change(gd, cv, dd, snap.damping)
        ratio = reduction_ratio(obs, predicted)
        self.rule.update(ratio)
        self.last_terms = {"observed": obs, "predicted": predicted, "grad_dot_delta": gd, "curvature": cv,
                           "delta_sq": dd}  # fmt: skip
        return ratio
