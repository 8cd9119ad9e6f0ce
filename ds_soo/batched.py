"""A sparse step's preconditioning of equal-shaped blocks as batched ops (one process).

Blocks of equal shape (ViT and GPT layers repeat) are stacked and preconditioned with ``bmm``, so that
a sparse step issues O(number of distinct shapes) kernels rather than a dozen per block. The step's
decisions stay device-side masks of shape (blocks,), read back with the step's other decisions: a
block with an exactly-zero gradient (unused) or a non-finite result keeps its gradient, and its
statistics and grafting state are left alone. The arithmetic is the per-block arithmetic (same
association order); only its schedule differs.

Eligible: K-FAC ``nn.Linear`` and GPT-2 ``Conv1D`` layers, whole-parameter (untiled) Shampoo and PSGD
blocks, dense or diagonal (an order-1 tensor), whose state is ready; anything else (K-FAC Conv2d,
tiles of a larger parameter) goes through the per-block path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ds_soo.curvature.packed import pack_upper
from ds_soo.curvature.precision import as_state


@dataclass
class Group:
    """Equal-shaped blocks: their ids, states and the parameter names holding their gradients."""

    method: str
    bids: list[str]
    states: list[Any]
    weights: list[str]
    biases: list[str] | None  # K-FAC: the bias column of [W | b]
    rows: int
    cols: int
    diagonal: bool = False
    transposed: bool = False  # K-FAC on a GPT-2 Conv1D: the weight is stored (in, out)
    # A one-step group (some equal-shaped blocks refresh on this step): its stacks are plain copies, so the
    # states keep their views of the long-lived group's stacks.
    transient: bool = False
    _cache: dict = field(default_factory=dict)

    def stacked(self, attr: str, keep: bool = False) -> torch.Tensor:
        """The states' ``attr`` tensors stacked. With ``keep`` (inverses and roots, which change only on
        refreshes, by replacement) the stack is reused while none of them is replaced or modified in place,
        and each state's tensor becomes a view of it."""
        tensors = [getattr(s, attr) for s in self.states]
        if not keep or self.transient:
            return torch.stack(tensors)
        hit = self._cache.get(attr)
        # The cache holds the tensors themselves (compared by identity and version counter): an id of a
        # freed tensor could be reused by a new one.
        if hit is not None and all(a is b and a._version == v for a, (b, v) in zip(tensors, hit[0], strict=True)):
            return hit[1]
        out = torch.stack(tensors)
        # The states keep views of the stack, so the stack is the only copy (no extra curvature memory).
        views = out.unbind(0)
        for state, view in zip(self.states, views, strict=True):
            setattr(state, attr, view)
        self._cache[attr] = ([(v, v._version) for v in views], out)
        return out


def group_key(method: str, block: Any, state: Any, shapes: dict[str, tuple[int, ...]]) -> tuple | None:
    """The batching key of a block, or None if it goes through the per-block path."""
    if not state.ready:
        return None
    if method == "kfac":
        layer = block.layer
        if layer is None or layer.kind not in ("linear", "conv1d"):
            return None
        return ("kfac", layer.kind, shapes[layer.weight_name], layer.bias_name is not None, block.rows, block.cols)
    if method not in ("shampoo", "psgd"):
        return None
    if len(block.pieces) != 1 or block.pieces[0][0] != block.block_id:
        return None  # a tile of a larger parameter
    if block.diagonal != state.diagonal:
        return None  # not a layout this module knows
    if method == "shampoo" and state.grafting == "adam" and state.graft_v is None:
        return None  # grafting state not created yet: the per-block path creates it
    if method == "shampoo" and state.left is None:
        return None
    return (method, shapes[block.block_id], block.diagonal, block.rows, block.cols)


def make_group(method: str, blocks: list[Any], states: list[Any], transient: bool = False) -> Group:
    b0 = blocks[0]
    if method == "kfac":
        weights = [b.layer.weight_name for b in blocks]
        biases = [b.layer.bias_name for b in blocks] if b0.layer.bias_name else None
    else:
        weights, biases = [b.block_id for b in blocks], None
    transposed = method == "kfac" and b0.layer.kind == "conv1d"
    return Group(method, [b.block_id for b in blocks], states, weights, biases, b0.rows, b0.cols, b0.diagonal,
                 transposed, transient)


def matrices(group: Group, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """The blocks' gradient matrices, (blocks, rows, cols) in their state dtype (float64 or fp32)."""
    w = as_state(torch.stack([grads[n] for n in group.weights]))
    if group.transposed:
        w = w.transpose(1, 2)
    if group.biases is not None:
        b = torch.stack([grads[n] for n in group.biases]).to(w.dtype)
        return torch.cat([w.reshape(len(group.bids), group.rows, -1), b.unsqueeze(-1)], dim=2)
    return w.reshape(len(group.bids), group.rows, group.cols).contiguous()


def write_back(group: Group, grads: dict[str, torch.Tensor], result: torch.Tensor) -> None:
    if group.method == "kfac":
        w = result[:, :, :-1] if group.biases is not None else result
        if group.transposed:
            w = w.transpose(1, 2)
        shape = grads[group.weights[0]].shape
        torch._foreach_copy_([grads[n] for n in group.weights], list(w.reshape(-1, *shape).unbind(0)))
        if group.biases is not None:
            torch._foreach_copy_([grads[n] for n in group.biases], list(result[:, :, -1].unbind(0)))
        return
    shape = grads[group.weights[0]].shape
    torch._foreach_copy_([grads[n] for n in group.weights], list(result.reshape(-1, *shape).unbind(0)))


def masked(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _masked_copy(group: Group, attr: str, mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> None:
    torch._foreach_copy_([getattr(s, attr) for s in group.states], list(masked(mask, new, old).unbind(0)))


def shampoo_stats(group: Group, g: torch.Tensor, active: torch.Tensor) -> None:
    """L += G G^T, R += G^T G (or their EMA) for the active blocks; diagonal blocks: D += g*g."""
    beta2 = group.states[0].beta2
    if group.diagonal:
        news = [("left", g.reshape(len(group.bids), -1).square())]
    else:
        gt = g.transpose(1, 2)
        news = [("left", torch.bmm(g, gt)), ("right", torch.bmm(gt, g))]
        if group.states[0].packed:
            news = [(attr, pack_upper(new)) for attr, new in news]
    for attr, new in news:
        old = group.stacked(attr)
        upd = old.mul(beta2).add_(new, alpha=1 - beta2) if beta2 < 1.0 else old.add(new)
        _masked_copy(group, attr, active, upd, old)


def shampoo_apply(group: Group, g: torch.Tensor, active: torch.Tensor, undo: list) -> torch.Tensor:
    """Grafted Shampoo directions; Adam's grafting state changes only for active blocks.

    ``undo`` receives (block index, action) for every grafting step that must be forgotten if its
    block turns out inactive."""
    if group.diagonal:
        direction = group.stacked("left_root", keep=True).unsqueeze(-1) * g
    else:
        left, right = group.stacked("left_root", keep=True), group.stacked("right_root", keep=True)
        direction = torch.bmm(torch.bmm(left, g), right)
    s0 = group.states[0]
    if s0.grafting == "none":
        return direction
    if s0.grafting == "adam":
        old = group.stacked("graft_v")
        for j, s in enumerate(group.states):
            s.graft_steps += 1
            undo.append((j, s.undo_graft_step))
        new_v = old.mul(s0.graft_beta2).addcmul_(g, g, value=1 - s0.graft_beta2)
        _masked_copy(group, "graft_v", active, new_v, old)
        corr = torch.tensor([1 - s.graft_beta2**s.graft_steps for s in group.states], dtype=g.dtype, device=g.device)
        graft = g / ((new_v / corr.view(-1, 1, 1)).sqrt() + s0.graft_epsilon)
    else:
        graft = g
    norm = direction.flatten(1).norm(dim=1)
    factor = torch.where(norm == 0, torch.ones_like(norm), graft.flatten(1).norm(dim=1) / norm)
    return direction * factor.view(-1, 1, 1)


def apply(group: Group, g: torch.Tensor, active: torch.Tensor, undo: list) -> torch.Tensor:
    """The preconditioned directions of the group's blocks, (blocks, rows, cols)."""
    if group.method == "kfac":
        return torch.bmm(torch.bmm(group.stacked("g_inv", keep=True), g), group.stacked("a_inv", keep=True))
    if group.method == "shampoo":
        return shampoo_apply(group, g, active, undo)
    if group.diagonal:  # PSGD's diagonal Q (an order-1 tensor): P = q * q, elementwise
        q = group.stacked("q", keep=True)
        return (q.square() * g.reshape(q.shape)).view_as(g)
    ql, qr = group.stacked("ql", keep=True), group.stacked("qr", keep=True)
    inner = torch.bmm(torch.bmm(ql, g), qr.transpose(1, 2))
    return torch.bmm(torch.bmm(ql.transpose(1, 2), inner), qr)


def kfac_step_factors(
    accs: list[dict[str, Any]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Equal-shaped step statistics (sums and their row counts, one process) stacked: A = sum / rows and
    G = sum * examples (see Preconditioner._reduced_factors), and the trace correction's inputs
    (f_sum, f_n, g_rows) as (blocks,) float64 tensors when some block has them (None otherwise; a block
    without them gets a zero sum, which leaves its G as it is)."""
    g_rows = [float(acc["g_rows"]) for acc in accs]
    a = as_state(torch.stack([acc["a"] for acc in accs]))
    a = a / torch.tensor([float(acc["a_rows"]) for acc in accs], dtype=a.dtype, device=device).view(-1, 1, 1)
    g = as_state(torch.stack([acc["g"] for acc in accs]))
    g = g * torch.tensor(g_rows, dtype=g.dtype, device=device).view(-1, 1, 1)
    has = [acc.get("f") is not None and acc.get("f_n", 0) > 0 for acc in accs]
    if not any(has):
        return a, g, None
    zero = next(acc["f"] for acc, h in zip(accs, has, strict=True) if h).new_zeros(())
    f_sum = torch.stack([acc["f"] if h else zero for acc, h in zip(accs, has, strict=True)]).to(device)
    f_n = [float(acc["f_n"]) if h else 1.0 for acc, h in zip(accs, has, strict=True)]
    as64 = {"dtype": torch.float64, "device": device}
    return a, g, (f_sum, torch.tensor(f_n, **as64), torch.tensor(g_rows, **as64))


def kfac_stats(states: list[Any], a_new: torch.Tensor, g_new: torch.Tensor, ok: torch.Tensor | None) -> None:
    """Fold stacked step factors into the states' existing running averages, where ``ok``."""
    decay = states[0].ema_decay
    for attr, new in (("a", a_new), ("g", g_new)):
        old = torch.stack([getattr(s, attr) for s in states])
        upd = old.mul(decay).add_(new, alpha=1.0 - decay)
        if ok is not None:
            upd = torch.where(ok, upd, old)
        torch._foreach_copy_([getattr(s, attr) for s in states], list(upd.unbind(0)))
