"""CollectiveExchange on every engine over gloo: gather, scatter, reduce, and how many collectives.

Each ``worker_*`` function runs on every rank (see ``dist_harness``) and returns the list of failed
checks, so one launch batches many checks. The ground truth is a single-process gradient of the same
global batch and, for DeepSpeed, also ``safe_get_full_grad``. DDP and FSDP2 run a float64 model on
float64 data with float64 exchanges and must match to ``RTOL`` (1e-10 of each tensor's largest entry);
DeepSpeed does not train float64 (see ``worker_deepspeed``), so its cases stay fp32, bf16 and fp16.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from dist_harness import assert_no_failures, launch

from ds_soo.distributed.assignment import assign_blocks
from ds_soo.distributed.collective import CollectiveExchange
from ds_soo.distributed.exchange import full_range

pytestmark = pytest.mark.dist

GLOBAL_BATCH = 8
COLLECTIVES = [
    "all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "all_to_all", "all_to_all_single", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
    "send", "recv", "isend", "irecv", "gather", "scatter", "all_gather_object", "barrier",
]  # fmt: skip


# max|got - want| <= RTOL * max|want| (plus a tiny atol for all-zero tensors) between two float64 paths.
RTOL = 1e-10
ATOL = 1e-14


# ---------------------------------------------------------------- shared worker helpers
def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    # Row counts 7, 5, 3, 1: uneven on 2 and 4 ranks, and smaller than the world for the last layers.
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(),
        torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1),
    ).to(dtype)  # fmt: skip


def global_batch(seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=dtype),
            torch.randn(GLOBAL_BATCH, 1, generator=g, dtype=dtype))  # fmt: skip


def local_batch(rank: int, world: int, dtype: torch.dtype = torch.float64):
    x, y = global_batch(dtype=dtype)
    n = GLOBAL_BATCH // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def reference(dtype: torch.dtype = torch.float64) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Initial weights and the full-batch gradient, computed in one process."""
    model = make_model(dtype=dtype)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = global_batch(dtype=dtype)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return init, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def whole_blocks(shapes: dict[str, tuple[int, ...]]) -> dict:
    return {f"whole:{n}": [(n, torch.arange(math.prod(s)))] for n, s in shapes.items()}


def tile_blocks(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Tiles of every matrix, as the preconditioner blocks them (2-D strided views of the shared range),
    plus two blocks mixing biases (one reversed, 1-D tensors of their own): every index exactly once."""
    blocks, biases = {}, []
    for n, s in shapes.items():
        if len(s) != 2:
            biases.append(n)
            continue
        rows, cols = s
        for r0, r1 in ((0, (rows + 1) // 2), ((rows + 1) // 2, rows)):
            for c0, c1 in ((0, (cols + 1) // 2), ((cols + 1) // 2, cols)):
                if r1 > r0 and c1 > c0:
                    idx = full_range(rows * cols).view(rows, cols)[r0:r1, c0:c1]
                    blocks[f"{n}[{r0}:{r1},{c0}:{c1}]"] = [(n, idx)]
    first, second = (math.prod(shapes[b]) for b in biases[:2])
    blocks["biases:a"] = [(biases[0], torch.arange(first).flip(0)), (biases[1], torch.arange(second))]
    blocks["biases:b"] = [(b, torch.arange(math.prod(shapes[b]))) for b in biases[2:]]
    return blocks


def owners_for(blocks: dict, world: int) -> dict[str, int]:
    return assign_blocks({b: [sum(i.numel() for _, i in p)] for b, p in blocks.items()}, world).owner


def block_vector(full: dict[str, torch.Tensor], pieces) -> torch.Tensor:
    return torch.cat([full[n].reshape(-1)[i.reshape(-1)] for n, i in pieces])


def transform(vec: torch.Tensor, a: float, c: float) -> torch.Tensor:
    return a * vec + c * torch.arange(vec.numel(), dtype=vec.dtype, device=vec.device) / max(vec.numel(), 1)


def expected_after(full: dict[str, torch.Tensor], blocks: dict, a: float, c: float) -> dict[str, torch.Tensor]:
    out = {n: t.clone() for n, t in full.items()}
    for pieces in blocks.values():
        vec = transform(block_vector(full, pieces), a, c)
        pos = 0
        for n, i in pieces:
            out[n].view(-1)[i.reshape(-1)] = vec[pos : pos + i.numel()]
            pos += i.numel()
    return out


@contextmanager
def count_collectives():
    counts: Counter = Counter()
    saved = {}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:
            saved[name] = fn
            setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


class Checks:
    def __init__(self):
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}

    def ok(self, name: str, cond: bool, detail: str = "") -> None:
        if not cond:
            self.failures.append(f"{name} {detail}".strip())

    def close(self, name: str, got, want, rtol: float = RTOL, atol: float = ATOL) -> None:
        """max|got - want| <= rtol * max|want| + atol (a tensor-wide scale: tiny entries are not special)."""
        if got is None or want is None:
            self.ok(name, got is None and want is None, f"got {got is None and 'None'} want {want is None and 'None'}")
            return
        got, want = got.detach().double().cpu().reshape(-1), want.detach().double().cpu().reshape(-1)
        if got.shape != want.shape:
            self.failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        err = (got - want).abs().max().item() if want.numel() else 0.0
        scale = want.abs().max().item() if want.numel() else 0.0
        if not err <= rtol * scale + atol:
            self.failures.append(f"{name}: max err {err:.3g} (max|want| {scale:.3g}, rtol {rtol:g})")

    def result(self) -> dict:
        return {"failures": self.failures, "counts": self.counts}


def check_gather(c: Checks, tag: str, ex: CollectiveExchange, blocks: dict, owners: dict, truth, **tol) -> None:
    got = ex.gather_blocks(blocks, owners)
    mine = sorted(b for b, o in owners.items() if o == ex.rank)
    c.ok(f"{tag}: owned keys", sorted(got) == mine, f"{sorted(got)} != {mine}")
    for b in mine:
        c.close(f"{tag}: {b}", got.get(b), block_vector(truth, blocks[b]), **tol)


def count_calls(c: Checks, tag: str, fn) -> None:
    fn()  # builds and caches the plan (plus one all_reduce verifying it matches on all ranks)
    with count_collectives() as counts:
        fn()
    c.counts[tag] = sum(counts.values())
    c.ok(f"{tag}: collectives", dict(counts) == {"all_to_all_single": 1}, str(dict(counts)))


def check_reduce_and_flags(c: Checks, access) -> None:
    """reduce_to_owners on both code paths, any_true, broadcast_from_owners."""
    rank, world = access.rank, access.world_size
    shapes = {f"t{i}": s for i, s in enumerate([(3, 3), (5,), (2, 4), (7, 7), (1,), (4, 4, 2), (6,)])}
    base = {
        k: torch.arange(math.prod(s), dtype=torch.float64, device=access.device).reshape(s) + i
        for i, (k, s) in enumerate(shapes.items())
    }
    owners = {k: (i * 3) % world for i, k in enumerate(shapes)}
    for label, kwargs in {
        "reduce_scatter": {"pad_ratio": float("inf")},
        "per_owner": {"pad_ratio": 0.0},
        "small_buckets": {"bucket_mb": 100 / 2**20},
    }.items():
        ex = CollectiveExchange(access, dtype=torch.float64, **kwargs)
        tensors = {k: (rank + 1) * v for k, v in base.items()}
        with count_collectives() as counts:
            out = ex.reduce_to_owners(tensors, owners)
        c.counts[f"reduce:{label}"] = sum(counts.values())
        mine = sorted(k for k, o in owners.items() if o == rank)
        c.ok(f"reduce {label}: keys", sorted(out) == mine, f"{sorted(out)} != {mine}")
        for k in mine:
            c.close(f"reduce {label}: {k}", out[k], base[k] * world * (world + 1) / 2)
            c.ok(f"reduce {label}: {k} shape", tuple(out[k].shape) == shapes[k])
        want = {"reduce_scatter_single", "reduce_scatter_tensor"} if label == "reduce_scatter" else {"reduce"}
        c.ok(
            f"reduce {label}: path", bool(want & set(counts)) or (want == {"reduce"} and world == 1), str(dict(counts))
        )
        rep = {k: (v.clone() if owners[k] == rank else torch.full_like(v, -1.0)) for k, v in base.items()}
        ex.broadcast_from_owners(rep, owners)
        for k in shapes:
            c.close(f"broadcast {label}: {k}", rep[k], base[k])
    ex = CollectiveExchange(access, dtype=torch.float64)
    c.ok("any_true last rank", ex.any_true(rank == world - 1))
    c.ok("any_true none", not ex.any_true(False))


def exchange_roundtrip(c: Checks, tag: str, access, truth, read_full_grad, **tol) -> dict[str, torch.Tensor]:
    """Gather whole and tiled blocks, scatter a transform, read it back; returns the expected grads.
    Blocks travel in the truth's dtype, as the preconditioner's state dtype (float64 for a float64 model)."""
    shapes = {n: l.shape for n, l in access.param_layouts().items()}
    c.ok(f"{tag}: layout names", sorted(shapes) == sorted(truth), f"{sorted(shapes)}")
    c.ok(f"{tag}: layout shapes", all(tuple(truth[n].shape) == s for n, s in shapes.items()), str(shapes))
    dtype = next(iter(truth.values())).dtype
    ex = CollectiveExchange(access, dtype=dtype)
    whole, tiles = whole_blocks(shapes), tile_blocks(shapes)
    whole_owners, tile_owners = owners_for(whole, ex.world_size), owners_for(tiles, ex.world_size)
    check_gather(c, f"{tag} whole", ex, whole, whole_owners, truth, **tol)
    check_gather(c, f"{tag} tiles", ex, tiles, tile_owners, truth, **tol)
    count_calls(c, f"{tag} gather", lambda: ex.gather_blocks(tiles, tile_owners))
    got = ex.gather_blocks(tiles, tile_owners)
    c.ok(f"{tag}: gathered dtype", all(v.dtype == dtype for v in got.values()), str({v.dtype for v in got.values()}))
    results = {b: transform(v, 2.0, 0.01) for b, v in got.items()}
    ex.scatter_blocks(tiles, tile_owners, results)
    expected = expected_after(truth, tiles, 2.0, 0.01)
    for n in sorted(truth):
        c.close(f"{tag} after scatter: {n}", read_full_grad(n), expected[n], **tol)
    # Scatter the same values again to count collectives; the gradients must not change.
    count_calls(c, f"{tag} scatter", lambda: ex.scatter_blocks(tiles, tile_owners, results))
    return expected


# ---------------------------------------------------------------- DDP and FSDP2
def _step_and_check(c: Checks, tag: str, opt, init, expected, read_weight) -> None:
    opt.step()
    for n in sorted(init):
        c.close(f"{tag} step: {n}", read_weight(n), init[n] - expected[n])


def worker_device() -> torch.device:
    """cuda:<local rank> under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def worker_ddp_fsdp2() -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    from ds_soo.distributed.engines import access_for
    from ds_soo.distributed.engines.ddp import DDPGradientAccess
    from ds_soo.distributed.engines.fsdp2 import FSDP2GradientAccess

    rank, world = dist.get_rank(), dist.get_world_size()
    device = worker_device()
    init, truth = reference()
    c = Checks()
    x, y = (t.to(device) for t in local_batch(rank, world))

    # DDP
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(make_model().to(device), device_ids=ids)
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    access = access_for(ddp)
    c.ok("ddp adapter type", isinstance(access, DDPGradientAccess))
    params = dict(ddp.module.named_parameters())
    expected = exchange_roundtrip(c, "ddp", access, truth, lambda n: params[n].grad)
    _step_and_check(c, "ddp", torch.optim.SGD(ddp.parameters(), lr=1.0), init, expected, lambda n: params[n])
    check_reduce_and_flags(c, access)
    check_missing_grads(c, access, params)

    # FSDP2
    model = make_model().to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.nn.functional.mse_loss(model(x), y).backward()
    access = access_for(model)
    c.ok("fsdp2 adapter type", isinstance(access, FSDP2GradientAccess))
    params = dict(model.named_parameters())
    empty = [n for n in params if access.local_grad(n).numel() == 0]
    c.counts["fsdp2 empty shards here"] = len(empty)
    expected = exchange_roundtrip(c, "fsdp2", access, truth, lambda n: params[n].grad.full_tensor())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _step_and_check(c, "fsdp2", opt, init, expected, lambda n: params[n].full_tensor())
    c.ok("fsdp2 has_overflow", not access.has_overflow())
    return c.result()


def check_missing_grads(c: Checks, access, params) -> None:
    """A parameter without .grad: its own block gathers as None, mixed blocks see zeros, scatter skips it."""
    for p in params.values():
        p.grad = torch.ones_like(p)
    params["4.bias"].grad = None
    ex = CollectiveExchange(access, dtype=torch.float64)
    world = access.world_size
    blocks = {
        "only_missing": [("4.bias", torch.arange(3))],
        "mixed": [("2.bias", torch.arange(5)), ("4.bias", torch.tensor([2, 0]))],
        "present": [("6.bias", torch.arange(1))],
    }
    owners = {"only_missing": world - 1, "mixed": 0, "present": world - 1}
    got = ex.gather_blocks(blocks, owners)
    if access.rank == world - 1:
        c.ok("missing: None block", got["only_missing"] is None)
        c.close("missing: present", got["present"], torch.ones(1))
    if access.rank == 0:
        c.close("missing: mixed zeros", got["mixed"], torch.tensor([1.0] * 5 + [0.0, 0.0]))
    # The owner of "present" sends no result: that gradient must stay untouched everywhere.
    results = {b: torch.full((sum(i.numel() for _, i in blocks[b]),), 5.0) for b, o in owners.items() if o == ex.rank}
    results.pop("present", None)
    ex.scatter_blocks(blocks, owners, results)
    c.close("missing: mixed written", params["2.bias"].grad, torch.full((5,), 5.0))
    c.close("missing: skipped untouched", params["6.bias"].grad, torch.ones(1))
    c.ok("missing: still None", params["4.bias"].grad is None)
    c.ok("has_overflow finite", not access.has_overflow())
    if access.rank == 0:
        params["0.bias"].grad[1] = float("nan")
    c.ok("has_overflow nan on rank 0", access.has_overflow())


# ---------------------------------------------------------------- DeepSpeed
FP16_SCALE_POWER = 8  # a static-ish initial loss scale of 256 that these small gradients cannot overflow


def _ds_config(stage: int, gas: int, world: int, prec: str, persist: bool) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (world * gas),
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 defaults to 1.0, which would change the step
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if prec.startswith("bf16"):
        cfg["bf16"] = {"enabled": True}
    if prec == "bf16-fp32acc":  # fp32 gradient accumulation: ZeRO-1 then runs DeepSpeed's BF16_Optimizer
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if prec == "fp16":  # CUDA only: DeepSpeed's CPU accelerator refuses fp16
        cfg["fp16"] = {"enabled": True, "initial_scale_power": FP16_SCALE_POWER}
    if stage == 3 and not persist:  # every param partitioned, not kept whole as small params are
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return cfg


def _ds_case(c: Checks, stage: int, gas: int, prec: str, persist: bool, init, truth) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from ds_soo.distributed.engines import access_for
    from ds_soo.distributed.engines.deepspeed import DeepSpeedGradientAccess, DeepSpeedOracleAccess

    rank, world = dist.get_rank(), dist.get_world_size()
    tag = f"zero{stage}-{prec}-gas{gas}{'' if persist else '-nopersist'}"
    model = make_model(dtype=torch.float32)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=_ds_config(stage, gas, world, prec, persist)
    )
    x, y = (t.to(engine.device) for t in local_batch(rank, world, torch.float32))
    mb = x.shape[0] // gas
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(prec, torch.bfloat16)
    for m in range(gas):
        out = engine(x[m * mb : (m + 1) * mb].to(dtype)).float()
        engine.backward(torch.nn.functional.mse_loss(out, y[m * mb : (m + 1) * mb]))
        if m < gas - 1:
            engine.step()  # off the boundary this only advances DeepSpeed's micro-step counter
    params = dict(engine.module.named_parameters())
    access = access_for(engine)
    # The optimizer divides by the loss scale; the gradients carry it except at ZeRO-0, whose
    # DeepSpeed 0.19 backward skips the scaling (so its fp16 updates come out `step_div` too small).
    step_div = 2.0**FP16_SCALE_POWER if prec == "fp16" else 1.0
    scale = 1.0 if stage == 0 else step_div
    c.ok(f"{tag}: adapter", isinstance(access, DeepSpeedGradientAccess) and access.at_boundary())
    c.ok(f"{tag}: grad_scale", access.grad_scale() == scale, f"{access.grad_scale()} != {scale}")

    def full_grad(n):
        return safe_get_full_grad(params[n])

    ds_truth = {n: full_grad(n).detach().clone().float().cpu() for n in sorted(params)}
    # Low-precision gradient storage rounds both what backward produced and what is written back. fp32:
    # DeepSpeed's own gradients against the exchange are exact; against the single process (fp32 half-batch
    # sums) the largest measured max rel diff is 1.6e-7 (world 2) and 2.3e-7 (world 4, ATEN_CPU_CAPABILITY=
    # default; 1.3e-7 with AVX-512/AVX2): a few times that.
    tol = {"rtol": 1e-6, "atol": 1e-12} if prec == "fp32" else {"rtol": 1e-2, "atol": 1e-3 * scale}
    if prec in ("fp32", "fp16"):  # bf16's forward differs from the fp32 reference beyond any tolerance
        for n in sorted(params):
            c.close(f"{tag}: safe_get_full_grad vs single process: {n}", ds_truth[n], truth[n] * scale, **tol)

    # Oracle: public API, collective per parameter. Scatter T1 through it first.
    oracle = DeepSpeedOracleAccess(engine)
    tiles = tile_blocks({n: t.shape for n, t in ds_truth.items()})
    owners = owners_for(tiles, world)
    with oracle.session():
        oex = CollectiveExchange(oracle)
        check_gather(c, f"{tag} oracle", oex, tiles, owners, ds_truth, **tol)
        got = oex.gather_blocks(tiles, owners)
        oex.scatter_blocks(tiles, owners, {b: transform(v, 2.0, 0.01) for b, v in got.items()})
    after_oracle = expected_after(ds_truth, tiles, 2.0, 0.01)
    for n in sorted(params):
        c.close(f"{tag} oracle wrote: {n}", full_grad(n), after_oracle[n], **tol)

    # Direct access reads what the public API wrote, then scatters T2 on top.
    expected = exchange_roundtrip(c, tag, access, after_oracle, full_grad, **tol)
    c.ok(f"{tag}: no overflow", not access.has_overflow())
    engine.step()
    step_tol = tol if prec == "fp32" else {"rtol": 1e-2, "atol": 1e-2}
    for n in sorted(params):
        w = params[n].detach() if stage == 0 else safe_get_full_fp32_param(params[n])
        c.close(f"{tag} step: {n}", w, init[n] - expected[n] / step_div, **step_tol)
    engine.destroy()


def worker_deepspeed(cases: list[list]) -> dict:
    """``cases``: [stage, gradient accumulation steps, precision, keep small ZeRO-3 params whole];
    precision is fp32, bf16, bf16-fp32acc (bf16 params, fp32 gradient accumulation) or fp16.

    fp32 at most: DeepSpeed 0.19.8 on the CPU accelerator refuses float64 at ZeRO-0 (gradient all-reduce:
    "unsupported grad type") and ZeRO-3 (zero.Init: "Invalid data type"), and ZeRO-1/2 keep fp32 master
    weights and gradient partitions for a float64 model."""
    init, truth = reference(torch.float32)
    c = Checks()
    for stage, gas, prec, persist in cases:
        _ds_case(c, stage, gas, prec, bool(persist), init, truth)
    return c.result()


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("world", [2, 4])
def test_ddp_and_fsdp2(world):
    results = launch("tests/test_dist_exchange.py:worker_ddp_fsdp2", nproc=world)
    assert_no_failures(results)
    assert results[0]["counts"]["ddp gather"] == 1
    if world == 4:  # rank 3 holds no rows of the 3- and 1-row params
        assert results[3]["counts"]["fsdp2 empty shards here"] >= 3


def test_deepspeed_zero_0123_world2():
    cases = [
        [0, 1, "fp32", 1], [1, 1, "fp32", 1], [2, 2, "fp32", 1], [3, 2, "fp32", 1],
        [0, 1, "bf16", 1], [2, 1, "bf16", 1], [1, 2, "bf16-fp32acc", 1],
    ]  # fmt: skip
    assert_no_failures(launch("tests/test_dist_exchange.py:worker_deepspeed", nproc=2, args={"cases": cases}))


def test_deepspeed_zero_23_world4():
    cases = [[2, 2, "fp32", 1], [3, 1, "fp32", 0]]
    assert_no_failures(launch("tests/test_dist_exchange.py:worker_deepspeed", nproc=4, args={"cases": cases}))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")


@needs_cuda
def test_cuda_nccl_world1():
    """The device paths (CUDA buffers and index plans, NCCL) and fp16 loss scaling, which DeepSpeed's
    CPU accelerator refuses. NCCL allows one rank per GPU, so this runs at the GPUs' count."""
    world = torch.cuda.device_count()
    results = launch("tests/test_dist_exchange.py:worker_ddp_fsdp2", nproc=world, backend="nccl")
    assert_no_failures(results)
    pytest.importorskip("deepspeed")
    cases = [
        [0, 1, "fp32", 1], [1, 1, "fp32", 1], [2, 2, "fp32", 1], [3, 1, "fp32", 0],
        [0, 1, "fp16", 1], [1, 1, "fp16", 1], [2, 1, "fp16", 1], [3, 2, "fp16", 1],
        [2, 1, "bf16", 1], [3, 1, "bf16", 1], [1, 1, "bf16-fp32acc", 1],
    ]  # fmt: skip
    results = launch("tests/test_dist_exchange.py:worker_deepspeed", nproc=world, args={"cases": cases},
                     backend="nccl")  # fmt: skip
    assert_no_failures(results)
