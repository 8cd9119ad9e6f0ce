"""Shampoo/PSGD blocking: size-1 dims are dropped before a tensor is tiled (a (1, T, d) position
embedding is one T x d block, a (1, 1, d) cls token a diagonal one), a ViT-like model with both trains,
and state for blocks this preconditioner does not have is refused, not dropped."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ds_soo.config import ConfigError
from ds_soo.distributed.exchange import full_range
from ds_soo.preconditioner import Preconditioner

METHODS = ["shampoo", "psgd"]


class Holder(nn.Module):
    """Parameters of given shapes, named p0, p1, ..."""

    def __init__(self, *shapes: tuple[int, ...]):
        super().__init__()
        for i, shape in enumerate(shapes):
            self.register_parameter(f"p{i}", nn.Parameter(torch.zeros(shape)))


def _blocks(method: str, max_dim: int, *shapes: tuple[int, ...]) -> dict[str, tuple[int, int, bool, torch.Tensor]]:
    cfg = {"method": method, method: {"max_preconditioner_dim": max_dim}}
    pre = Preconditioner(Holder(*shapes), cfg)
    out = {}
    for b in pre.blocks:
        ((_, idx),) = b.pieces
        out[b.block_id] = (b.rows, b.cols, b.diagonal, idx)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_singleton_dims_are_dropped_before_blocking(method):
    blocks = _blocks(method, 1024, (1, 65, 192), (1, 1, 192), (192,), (4, 1, 3), (1,))
    # (1, 65, 192): one 65 x 192 block named like the parameter, not 13 tiles of 1 x 1024.
    rows, cols, diag, idx = blocks["p0"]
    assert (rows, cols, diag) == (65, 192, False)
    assert torch.equal(idx, torch.arange(65 * 192))
    # A cls token and a bias: one diagonal block each, O(n).
    assert blocks["p1"][:3] == (192, 1, True) and torch.equal(blocks["p1"][3], torch.arange(192))
    assert blocks["p2"][:3] == (192, 1, True)
    assert blocks["p3"][:3] == (4, 3, False) and torch.equal(blocks["p3"][3], torch.arange(12))
    assert blocks["p4"][:3] == (1, 1, True)
    assert sorted(blocks) == ["p0", "p1", "p2", "p3", "p4"]


@pytest.mark.parametrize("method", METHODS)
def test_tiles_of_a_squeezed_tensor_index_its_flat_elements(method):
    blocks = _blocks(method, 64, (1, 65, 192))
    flat = torch.arange(65 * 192).view(65, 192)
    expect = {
        f"p0[{r0}:{r1},{c0}:{c1}]": flat[r0:r1, c0:c1].reshape(-1)
        for r0, r1 in ((0, 64), (64, 65))
        for c0, c1 in ((0, 64), (64, 128), (128, 192))
    }
    assert sorted(blocks) == sorted(expect)
    for bid, idx in expect.items():
        assert torch.equal(blocks[bid][3].reshape(-1), idx), bid
        assert not blocks[bid][2]


@pytest.mark.parametrize("method", METHODS)
def test_blocks_without_singleton_dims_keep_their_ids(method):
    blocks = _blocks(method, 4, (10, 7), (3, 2, 2), (300,))
    expect = {f"p0[{r0}:{r1},{c0}:{c1}]" for r0, r1 in ((0, 4), (4, 8), (8, 10)) for c0, c1 in ((0, 4), (4, 7))}
    assert set(blocks) == expect | {"p1", "p2"}
    assert blocks["p1"][:3] == (3, 4, False)
    assert blocks["p2"][:3] == (300, 1, True)


class TinyViT(nn.Module):
    """Patch embedding, cls token (1, 1, d), position embedding (1, T + 1, d), a pre-LN MLP block, mean pooling."""

    def __init__(self, patches: int = 6, patch_dim: int = 5, d: int = 8, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(patch_dim, d)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, patches + 1, d))
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1) + self.pos
        tokens = tokens + self.mlp(self.norm(tokens))
        return self.head(tokens.mean(dim=1))


@pytest.mark.parametrize("method", METHODS)
def test_vit_with_position_embedding_and_cls_token_trains(method):
    torch.manual_seed(0)
    model = TinyViT()
    cfg = {"method": method, "damping": {"value": 1e-3}, "schedule": {"warm_steps": 100, "warm_interval": 1},
           "kfac": {"kl_clip": None}}
    pre = Preconditioner(model, cfg)
    by_id = {b.block_id: b for b in pre.blocks}
    assert (by_id["pos"].rows, by_id["pos"].cols, by_id["pos"].diagonal) == (7, 8, False)
    assert by_id["cls"].diagonal and by_id["norm.weight"].diagonal and by_id["embed.bias"].diagonal
    assert not pre.fall_through
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    steps = 30
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        pre.step()
        opt.step()
    assert pre.counters["preconditioned_steps"] == steps
    assert all(v == steps for v in pre.block_preconditioned.values()) and set(pre.block_preconditioned) == set(by_id)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p.detach(), start[name]), f"{name} did not move"
    assert max(losses[-3:]) < 0.8 * losses[0], losses


def _trained(method: str, seed: int = 0) -> Preconditioner:
    torch.manual_seed(seed)
    model = TinyViT()
    pre = Preconditioner(model, {"method": method, "schedule": {"warm_steps": 100, "warm_interval": 1}})
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        model.zero_grad()
        x, y = torch.randn(8, 6, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
    return pre


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("method", METHODS)
def test_load_state_dict_refuses_unknown_blocks_and_changes_nothing(method):
    saved = _trained(method, seed=1).state_dict()
    # State from before the blocking changed: the position embedding was tiled as 1 x 56.
    saved["blocks"]["pos[0:1,0:32]"] = saved["blocks"].pop("pos")
    saved["counters"] = {k: v + 5 for k, v in saved["counters"].items()}
    pre = _trained(method, seed=2)
    before = copy.deepcopy(pre.state_dict())
    with pytest.raises(ConfigError, match=r"pos\[0:1,0:32\].*blocking changed"):
        pre.load_state_dict(saved)
    _assert_same_state(pre.state_dict(), before)


@pytest.mark.parametrize("method", METHODS)
def test_load_state_dict_refuses_a_known_block_of_another_shape(method):
    # The same id, once blocked otherwise: a (1, 7, 8) tensor's dense 1 x 56 state, a dense Q for a bias.
    saved = _trained(method, seed=1).state_dict()
    if method == "shampoo":
        saved["blocks"]["pos"] |= {"left": torch.ones(1, 1), "right": torch.eye(56)}
    else:
        saved["blocks"]["pos"] = {"ql": torch.ones(1, 1), "qr": torch.eye(56)}
        saved["blocks"]["embed.bias"] = {"ql": torch.eye(8), "qr": torch.ones(1, 1)}
    pre = _trained(method, seed=2)
    before = copy.deepcopy(pre.state_dict())
    with pytest.raises(ConfigError, match=r"block (pos|embed\.bias)"):
        pre.load_state_dict(saved)
    _assert_same_state(pre.state_dict(), before)


@pytest.mark.parametrize("method", ["kfac", "shampoo", "psgd"])
def test_whole_parameter_pieces_share_one_index_storage(method):
    """A block covering a whole parameter indexes it with a view of one shared range, not an int64
    per element of its own."""
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(40, 40), nn.Tanh())])
    shared = full_range(1600).untyped_storage().data_ptr()  # the range is already long enough: no growth
    pre = Preconditioner(model, {"method": method, "kfac": {"kl_clip": None}})
    storages, numels = {}, []
    params = dict(model.named_parameters())
    for block in pre.blocks:
        for name, idx in block.pieces:
            if idx.numel() == params[name].numel():
                numels.append(idx.numel())
                storages[idx.untyped_storage().data_ptr()] = idx.untyped_storage().nbytes()
                assert torch.equal(idx, torch.arange(idx.numel()))
    # 16 pieces, one storage: index memory does not grow with the number of blocks.
    assert len(numels) == 16 and list(storages) == [shared]
    # The preconditioned step is the same as with private index tensors (the values are identical).
    x = torch.randn(64, 40)
    model(x).square().mean().backward()
    assert pre.step() and pre.counters["preconditioned_steps"] == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _run_tiled(method: str, *shapes: tuple[int, ...]) -> tuple[Preconditioner, list[torch.Tensor]]:
    """One preconditioned step on random gradients of parameters tiled to 64: the blocks and the results."""
    torch.manual_seed(0)
    model = Holder(*shapes)
    small = {"max_preconditioner_dim": 64}
    pre = Preconditioner(model, {"method": method, "shampoo": {**small, "grafting": "none"}, "psgd": small})
    for k, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(k))
    assert pre.step() and pre.counters["preconditioned_steps"] == 1
    return pre, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("method", METHODS)
def test_tiles_are_views_and_precondition_like_gathered_ones(method, monkeypatch):
    """Tiles of whole rows and column tiles read and write the gradient as views of it (strided for a
    column tile); the result equals the gather path's exactly."""
    import ds_soo.distributed.exchange as exchange

    pre, views = _run_tiled(method, (150, 12), (12, 150))
    bands = [b for b in pre.blocks if b.block_id.startswith("p0[")]
    assert len(bands) == 3 and all(exchange._range_start(b.pieces[0][1]) is not None for b in bands)
    columns = [b.pieces[0][1] for b in pre.blocks if b.block_id.startswith("p1[")]
    assert len(columns) == 3 and all(idx.dim() == 2 and not idx.is_contiguous() for idx in columns)
    g = torch.zeros(12 * 150)
    assert all(exchange._view_of(g, idx) is not None for idx in columns)
    monkeypatch.setattr(exchange, "_view_of", lambda g, idx: None)  # every piece gathered and scattered
    _, gathered = _run_tiled(method, (150, 12), (12, 150))
    for a, b in zip(views, gathered, strict=True):
        assert torch.equal(a, b)
    # Preconditioning ran: the gradients are not the raw ones.
    for k, shape in enumerate([(150, 12), (12, 150)]):
        assert not torch.allclose(views[k], torch.randn(shape, generator=torch.Generator().manual_seed(k)))


def _index_storages(pre: Preconditioner) -> dict[int, int]:
    """data_ptr -> bytes of every storage behind a block index."""
    return {idx.untyped_storage().data_ptr(): idx.untyped_storage().nbytes() for b in pre.blocks for _, idx in b.pieces}


@pytest.mark.parametrize("method", METHODS)
def test_column_tiles_hold_no_index_storage_of_their_own(method):
    """A column tile indexes its parameter with a strided view of the shared range: index memory does
    not grow with the number of tiled parameters (a private int64 index is 8 bytes per 4-byte weight)."""
    shared = full_range(4 * 24 * 150).untyped_storage().data_ptr()  # long enough already: no growth below

    def blocked(n: int) -> Preconditioner:
        cfg = {"method": method, method: {"max_preconditioner_dim": 64}}
        return Preconditioner(Holder(*[(24, 150), (150, 24)] * n), cfg)

    one, four = blocked(1), blocked(4)
    tiles = [idx for b in four.blocks for _, idx in b.pieces if idx.dim() == 2]
    assert len(tiles) == 4 * 3  # every (24, 150) parameter: three column tiles
    assert list(_index_storages(one)) == [shared] and list(_index_storages(four)) == [shared]
    assert sum(_index_storages(four).values()) == sum(_index_storages(one).values())
    # The views still name the tiles' flat positions, row-major.
    flat = torch.arange(24 * 150).view(24, 150)
    for b in four.blocks:
        if b.block_id.startswith("p0["):
            ((_, idx),) = b.pieces
            r0, r1, c0, c1 = (int(v) for v in b.block_id[3:-1].replace(",", ":").split(":"))
            assert torch.equal(idx.reshape(-1), flat[r0:r1, c0:c1].reshape(-1))


@pytest.mark.parametrize("contiguous", [True, False])
def test_take_and_put_on_a_column_tile_touch_exactly_its_slice(contiguous):
    """Reading a column tile gives the dense slice, row-major; writing it changes that slice and
    nothing else, through the strided view or (a gradient that is not contiguous) the gather."""
    from ds_soo.distributed.exchange import _put, _take, _view_of

    rows, cols, (r0, r1, c0, c1) = 24, 150, (8, 20, 64, 128)
    idx = full_range(rows * cols).view(rows, cols)[r0:r1, c0:c1]
    # Offset into its storage, as a flat gradient inside a larger buffer is.
    base = torch.randn(3 + 2 * rows * cols, generator=torch.Generator().manual_seed(0))
    step = 1 if contiguous else 2
    g = base[3 : 3 + step * rows * cols : step]
    assert (_view_of(g, idx) is not None) == contiguous
    dense = g.clone().view(rows, cols)
    taken = _take(g, idx)
    assert taken.shape == (idx.numel(),) and torch.equal(taken, dense[r0:r1, c0:c1].reshape(-1))
    before = base.clone()
    values = -torch.arange(idx.numel(), dtype=g.dtype)
    _put(g, idx, values)
    expect = dense.clone()
    expect[r0:r1, c0:c1] = values.view(r1 - r0, c1 - c0)
    assert torch.equal(g.reshape(rows, cols), expect)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[3 : 3 + step * rows * cols : step].view(rows, cols)[r0:r1, c0:c1] = False
    assert torch.equal(base[untouched], before[untouched])
