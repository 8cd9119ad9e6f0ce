"""In-process checks of the distributed pieces that need no second rank (world size 1 over gloo).

The exchange comparison runs float64 tensors through a float64 CollectiveExchange: the two paths must
agree to ``RTOL`` of each tensor's largest entry.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from ds_soo.distributed.collective import CollectiveExchange
from ds_soo.distributed.engines.deepspeed import engine_grad_scale
from ds_soo.distributed.engines.fsdp2 import shard0_rows
from ds_soo.distributed.exchange import LocalExchange
from ds_soo.distributed.layout import LocalGradientAccess

RTOL = 1e-10


@pytest.fixture
def world1():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _params():
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    ps = {"w": torch.nn.Parameter(torch.randn(4, 5, **f64)), "b": torch.nn.Parameter(torch.randn(4, **f64)),
          "unused": torch.nn.Parameter(torch.randn(3, **f64))}  # fmt: skip
    ps["w"].grad, ps["b"].grad = torch.randn(4, 5, **f64), torch.randn(4, **f64)
    return ps


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.float64 and got.shape == want.shape
    assert float((got - want).abs().max()) <= RTOL * float(want.abs().max())


def _blocks():
    return {
        "w_tile": [("w", torch.tensor([7, 2, 3, 12]))],
        # Not a full-size permutation: LocalExchange treats any full-size piece as arange(numel).
        "mixed": [("b", torch.tensor([3, 0, 2])), ("unused", torch.tensor([1])), ("w", torch.tensor([0]))],
        "none": [("unused", torch.arange(3))],
    }


def test_world1_matches_local_exchange(world1):
    a, b = _params(), _params()
    blocks, owners = _blocks(), {"w_tile": 0, "mixed": 0, "none": 0}
    ce = CollectiveExchange(LocalGradientAccess(a), dtype=torch.float64)
    le = LocalExchange(LocalGradientAccess(b))
    got, want = ce.gather_blocks(blocks, owners), le.gather_blocks(blocks, owners)
    assert got.keys() == want.keys() and got["none"] is None
    for k in ("w_tile", "mixed"):
        _assert_close(got[k], want[k])
    results = {k: torch.randn(v.numel(), dtype=torch.float64) for k, v in want.items() if v is not None}
    ce.scatter_blocks(blocks, owners, results)
    le.scatter_blocks(blocks, owners, results)
    for n in ("w", "b"):
        _assert_close(a[n].grad, b[n].grad)
    assert a["unused"].grad is None
    t = {"x": torch.randn(2, 2, dtype=torch.float64), "y": torch.arange(3.0, dtype=torch.float64)}
    out = ce.reduce_to_owners(t, {"x": 0, "y": 0})
    _assert_close(out["x"], t["x"])
    assert ce.any_true(True) and not ce.any_true(False)


def test_plan_errors(world1):
    ce = CollectiveExchange(LocalGradientAccess(_params()))
    with pytest.raises(ValueError, match="owner ranks"):
        ce.gather_blocks({"a": [("b", torch.arange(2))]}, {"a": 1})
    with pytest.raises(ValueError, match="does not know"):
        ce.gather_blocks({"a": [("nope", torch.arange(2))]}, {"a": 0})
    with pytest.raises(ValueError, match="provided range"):
        ce.gather_blocks({"a": [("b", torch.tensor([4]))]}, {"a": 0})
    with pytest.raises(ValueError, match="expected 2"):
        ce.scatter_blocks({"a": [("b", torch.arange(2))]}, {"a": 0}, {"a": torch.zeros(3)})


def test_plans_are_cached_by_block_index_identity(world1):
    ce = CollectiveExchange(LocalGradientAccess(_params()))
    blocks, owners = _blocks(), {"w_tile": 0, "mixed": 0, "none": 0}
    ce.gather_blocks(blocks, owners)
    plan = ce._cache[id(blocks)].gather
    ce.gather_blocks(blocks, dict(owners))
    assert ce._cache[id(blocks)].gather is plan
    ce.gather_blocks(dict(blocks), owners)  # a new dict is a new block index
    assert len(ce._cache) == 2


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard0_rows_is_torch_chunk(world):
    for d0 in range(0, 20):
        sizes = [len(c) for c in torch.chunk(torch.arange(d0), world)] if d0 else []
        sizes += [0] * (world - len(sizes))
        got = [shard0_rows(d0, world, r) for r in range(world)]
        assert [b - a for a, b in got] == sizes
        assert all(got[r][1] == got[r + 1][0] for r in range(world - 1) if got[r + 1][1] > got[r + 1][0])


def test_deepspeed_grad_scale_reads_the_loss_scale():
    def engine(fp16, **opt):
        return types.SimpleNamespace(
            fp16_enabled=lambda: fp16, zero_optimization_stage=lambda: 2, optimizer=types.SimpleNamespace(**opt)
        )

    assert engine_grad_scale(engine(False, loss_scale=4.0)) == 1.0
    assert engine_grad_scale(engine(True, loss_scale=1024.0)) == 1024.0
    assert engine_grad_scale(engine(True, cur_scale=8.0)) == 8.0
    assert engine_grad_scale(engine(True, loss_scaler=types.SimpleNamespace(cur_scale=2.0))) == 2.0
