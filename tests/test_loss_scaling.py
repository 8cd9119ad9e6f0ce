"""A step that fp16-style loss scaling skips for overflow updates no curvature, on every rank.

DDP on 2 gloo ranks with ``torch.amp.GradScaler``: the overflowing step's gradients are left as they
are (so the scaler sees the overflow, skips the update and lowers its scale), the statistics and
inverses do not change, and the whole run equals the same run in one process.

The model and data are float64 (float64 curvature state; GradScaler's CPU unscale and overflow check
work on float64 gradients), so distributed against one process agrees to round-off (~1e-15) on every
CPU and 1e-10 of the largest weight separates it from a real difference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import launch
from torch import nn

pytestmark = pytest.mark.dist

STEPS, BAD_STEP, GLOBAL_BATCH = 4, 1, 8


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    f64 = torch.float64
    return torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=f64), torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=f64)


def train(method: str, rank: int, world: int) -> dict:
    from ds_soo import Preconditioner

    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cfg = {"method": method, "schedule": {"warm_steps": 100, "warm_interval": 1},
           "damping": {"value": 1e-2 if method == "kfac" else 1e-4}, "kfac": {"kl_clip": None}}
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model)
        pre = Preconditioner.for_engine(wrapped, cfg, scaler=scaler)
    else:
        wrapped = model
        from ds_soo.distributed.engines.ddp import DDPGradientAccess

        pre = Preconditioner(model, cfg, access=DDPGradientAccess(model, scaler=scaler))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots, scales = [], []
    for step in range(STEPS):
        x, y = batch(step)
        n = GLOBAL_BATCH // world
        x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        loss = nn.functional.mse_loss(wrapped(x), y)
        if step == BAD_STEP and rank == world - 1:
            loss = loss * float("inf")  # overflow on one rank only
        before = {b: {k: v.clone() for k, v in s.state_dict().items() if isinstance(v, torch.Tensor)}
                  for b, s in pre.states.items()}
        weights_before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(loss).backward()
        pre.step()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        scales.append(scaler.get_scale())
        if step == BAD_STEP:
            after = {b: {k: v for k, v in s.state_dict().items() if isinstance(v, torch.Tensor)}
                     for b, s in pre.states.items()}
            snapshots = [
                all(torch.equal(before[b][k], after[b][k]) for b in before for k in before[b]),
                all(torch.equal(a, p) for a, p in zip(weights_before, model.parameters(), strict=True)),
            ]
    return {
        "weights": [p.detach().tolist() for p in model.parameters()],
        "counters": dict(pre.counters), "scales": scales, "unchanged_on_bad_step": snapshots,
    }


def worker(method: str) -> dict:
    return train(method, dist.get_rank(), dist.get_world_size())


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_overflow_step_updates_no_curvature(method):
    results = launch(f"{__file__}:worker", nproc=2, args={"method": method})
    reference = train(method, 0, 1)
    for r in results + [reference]:
        assert r["unchanged_on_bad_step"] == [True, True], "curvature or weights changed on the skipped step"
        assert r["counters"]["skipped_nonfinite"] == 1
        assert r["counters"]["stats_updates"] == STEPS - 1
        assert r["counters"]["preconditioned_steps"] == STEPS - 1
        assert r["scales"][BAD_STEP] < r["scales"][BAD_STEP - 1], "the scaler never saw the overflow"
    for got in results:
        for w, ref in zip(got["weights"], reference["weights"], strict=True):
            w, ref = torch.tensor(w, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
            assert (w - ref).abs().max() <= 1e-10 * ref.abs().max(), "distributed run differs from one process"
