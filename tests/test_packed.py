"""Shampoo's statistics stored as packed upper triangles: the packing against element-by-element
references, the statistics against float64 sums of the raw gradients, the step against dense storage,
the memory it saves, and checkpoints that load across the setting."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from ds_soo import Preconditioner
from ds_soo.config import ConfigError
from ds_soo.curvature.packed import pack_upper, unpack_upper


def _upper_ref(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[-1]
    return torch.stack([m[..., i, j] for i in range(n) for j in range(i, n)], dim=-1)


def _symmetric_ref(p: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(*p.shape[:-1], n, n, dtype=p.dtype)
    k = 0
    for i in range(n):
        for j in range(i, n):
            out[..., i, j] = out[..., j, i] = p[..., k]
            k += 1
    return out


@pytest.mark.parametrize("n", [1, 2, 5, 12])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_pack_and_unpack_match_element_by_element_references(n, lead):
    g = torch.Generator().manual_seed(n)
    m = torch.randn(*lead, n, n, generator=g, dtype=torch.float64)
    assert torch.equal(pack_upper(m), _upper_ref(m))
    p = torch.randn(*lead, n * (n + 1) // 2, generator=g, dtype=torch.float64)
    assert torch.equal(unpack_upper(p), _symmetric_ref(p, n))
    sym = m + m.transpose(-1, -2)
    assert torch.equal(unpack_upper(pack_upper(sym)), sym)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"square matrices, got shape \(3, 4\)"):
        pack_upper(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="4 is not the packed length"):
        unpack_upper(torch.zeros(4))


class Net(nn.Module):
    """Equal-shaped layers (the batched path), a layer tiled by max_preconditioner_dim 24 (the per-block
    path) and biases (diagonal blocks, which stay vectors)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(10, 16)
        self.hidden = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.wide = nn.Linear(16, 40)
        self.out = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.out(torch.tanh(self.wide(h)))


def _cfg(packed: bool) -> dict:
    return {"method": "shampoo", "damping": {"value": 1e-2},
            "shampoo": {"max_preconditioner_dim": 24, "pack_statistics": packed},
            "schedule": {"warm_steps": 3, "warm_interval": 1, "sparse_interval": 2, "stagger": False,
                         "stats_sparse_interval": 1}}  # fmt: skip


def _train(model: nn.Module, pre: Preconditioner, steps: range, raw: list | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in steps:
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)
        x = x.to(next(model.parameters()).dtype)
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        if raw is not None:
            raw.append({n: p.grad.detach().double().clone() for n, p in model.named_parameters()})
        assert pre.step()
        opt.step()


def _block_grad(grads: dict[str, torch.Tensor], bid: str) -> torch.Tensor:
    """A block's gradient matrix from its id: a whole parameter ("name") or a tile ("name[r0:r1,c0:c1]")."""
    m = re.fullmatch(r"(.+)\[(\d+):(\d+),(\d+):(\d+)\]", bid)
    if m is None:
        return grads[bid]
    r0, r1, c0, c1 = map(int, m.groups()[1:])
    return grads[m.group(1)][r0:r1, c0:c1]


def _assert_close(got: torch.Tensor, ref: torch.Tensor, msg: str) -> None:
    """Path against path in float64: round-off ~1e-15 on every CPU, 1e-10 relative to the largest entry."""
    assert got.dtype == torch.float64 and ref.dtype == torch.float64, msg
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()), msg=msg)


def test_packed_statistics_are_the_gradient_sums_and_halve_the_memory():
    """A float64 model (float64 statistics): the packed sums match the test's own sums of the same
    gradients to float64 round-off (~1e-15 on every CPU), so 1e-10 separates any real difference."""
    torch.manual_seed(0)
    model = Net().double()
    pre = Preconditioner(model, _cfg(True))
    raw: list[dict[str, torch.Tensor]] = []
    _train(model, pre, range(6), raw)
    assert pre.counters["preconditioned_steps"] == 6
    dense_blocks = [b for b in pre.blocks if not b.diagonal]
    tiles = {"wide.weight[0:24,0:16]", "wide.weight[24:40,0:16]"}
    assert {b.block_id for b in dense_blocks} >= {"hidden.0.weight", *tiles}
    expected_bytes = 0
    for block in pre.blocks:
        st = pre.states[block.block_id]
        if block.diagonal:
            assert st.left.shape == (block.rows,) and st.right is None
            continue
        n, k = block.rows, block.cols
        # Stored packed: n(n+1)/2 and k(k+1)/2 numbers, not n^2 and k^2.
        assert st.left.shape == (n * (n + 1) // 2,) and st.right.shape == (k * (k + 1) // 2,)
        assert st.left.dtype == torch.float64 and st.right.dtype == torch.float64
        expected_bytes += 8 * (n * (n + 1) // 2 + k * (k + 1) // 2)
        gs = [_block_grad(r, block.block_id) for r in raw]
        left, right = sum(g @ g.T for g in gs), sum(g.T @ g for g in gs)
        got_left, got_right = _symmetric_ref(st.left.double(), n), _symmetric_ref(st.right.double(), k)
        torch.testing.assert_close(got_left, left, rtol=1e-10, atol=1e-11 * float(left.abs().max()))
        torch.testing.assert_close(got_right, right, rtol=1e-10, atol=1e-11 * float(right.abs().max()))
    assert sum(pre.states[b.block_id].left.numel() + pre.states[b.block_id].right.numel()
               for b in dense_blocks) * 8 == expected_bytes  # fmt: skip


def test_packed_and_dense_storage_train_alike():
    """The same run with dense statistics: equal weights within float64 round-off (a float64 model), both
    preconditioned on every step, and every parameter moves."""
    torch.manual_seed(0)
    model = Net().double()
    twin = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    packed, dense = Preconditioner(model, _cfg(True)), Preconditioner(twin, _cfg(False))
    _train(model, packed, range(7))
    _train(twin, dense, range(7))
    for pre in (packed, dense):
        assert pre.counters["preconditioned_steps"] == 7 and pre.counters["curvature_refreshes"] == 5
    assert packed.block_refreshes == dense.block_refreshes
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        _assert_close(p.detach(), q.detach(), n)
        assert not torch.equal(p.detach(), start[n]), f"{n} did not move"
    assert dense.states["hidden.0.weight"].left.shape == (16, 16)
    saved = sum(dense.states[b].nbytes() - packed.states[b].nbytes() for b in dense.states)
    assert saved == 8 * sum(b.rows * (b.rows - 1) // 2 + b.cols * (b.cols - 1) // 2
                            for b in dense.blocks if not b.diagonal)  # fmt: skip


@pytest.mark.parametrize("saved_packed", [True, False])
def test_checkpoints_load_across_the_setting(saved_packed):
    torch.manual_seed(0)
    model = Net().double()
    pre = Preconditioner(model, _cfg(saved_packed))
    _train(model, pre, range(4))
    state = copy.deepcopy(pre.state_dict())
    clone = copy.deepcopy(model)
    other = Preconditioner(clone, _cfg(not saved_packed))
    other.load_state_dict(state)
    for bid, st in pre.states.items():
        mine = other.states[bid]
        assert (mine.left.dim() == 1) == (not saved_packed or st.diagonal), bid
        if not st.diagonal:  # a dense statistic loads as its symmetric part (what a refresh factorises)
            for got, saved in ((mine.left_matrix(), st.left_matrix()), (mine.right_matrix(), st.right_matrix())):
                assert torch.equal(got, saved if saved_packed else 0.5 * (saved + saved.T)), bid
    # Both continue alike (a refresh step included).
    _train(model, pre, range(4, 6))
    _train(clone, other, range(4, 6))
    for (n, p), q in zip(model.named_parameters(), clone.parameters(), strict=True):
        _assert_close(p.detach(), q.detach(), n)


def test_a_statistic_of_another_shape_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = Net()
    pre = Preconditioner(model, _cfg(True))
    _train(model, pre, range(2))
    state = copy.deepcopy(pre.state_dict())
    before = pre.states["hidden.0.weight"].left.clone()
    for wrong, shape in ((torch.eye(5), r"\(5, 5\).*\(16, 16\)"), (torch.ones(10), r"\(10,\).*\(136,\)")):
        bad = copy.deepcopy(state)
        bad["blocks"]["hidden.0.weight"]["left"] = wrong
        with pytest.raises(ConfigError, match=r"block hidden\.0\.weight.*" + shape):
            pre.load_state_dict(bad)
        assert torch.equal(pre.states["hidden.0.weight"].left, before)
