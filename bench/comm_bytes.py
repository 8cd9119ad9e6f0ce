"""Bytes each rank sends during ``pre.step()``, counted exactly on gloo, and the locality trade-off.

Measured: for DDP, DeepSpeed ZeRO-2 and ZeRO-3 and FSDP2 at worlds 2 and 4, K-FAC and Shampoo, a small
char-GPT trains two steps; during the second ``pre.step()`` every torch.distributed collective is
intercepted in this process (the functions of the ``torch.distributed`` module are wrapped; ds_soo is
not touched) and the bytes each rank sends are added up, as a multiple of the model's fp32 gradient
bytes G. A collective's per-rank send volume is that of the bandwidth-optimal ring/pipeline algorithm,
the factors nccl-tests uses for bus bandwidth (S = the tensor's bytes, N = ranks):

    all_to_all_single: the input rows bound for other ranks (exact)
    all_reduce 2(N-1)/N S;  reduce_scatter (N-1)/N S_in;  all_gather (N-1)/N S_out
    reduce: S from every rank but the root (any reduction tree);  broadcast (N-1)/N S (pipelined chain)

Modelled from the engine's layouts (deterministic arithmetic, no timing): the gradient elements that
must move to each block's owner (the ranges other ranks *provide*) and back (the ranges other ranks
*hold*), under LPT and under the locality-aware assignment at several load bounds: bytes moved against
max/mean load. The measured all-to-all bytes equal the modelled LPT movement plus one 4-byte flag
per (block, peer).

    python bench/comm_bytes.py [--worlds 2 4] [--engines ddp zero2 zero3 fsdp2] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
METHODS = ("kfac", "shampoo")
SLACKS = (1.0, 1.10, 1.25, float("inf"))
BATCH = 8  # global batch; each rank gets BATCH / world windows


# ----------------------------------------------------------------------------- counting
class Counter:
    """Wraps torch.distributed's collectives; counts per-rank send bytes while ``active``."""

    NAMES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single",
             "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single",
             "all_to_all", "send", "isend", "gather", "scatter", "all_gather_object",
             "broadcast_object_list")  # fmt: skip

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.active = False
        self.depth = 0
        self.bytes: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._saved = {}
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))

    def restore(self) -> None:
        for name, fn in self._saved.items():
            setattr(self.dist, name, fn)

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self.active and self.depth == 0:
                sent = self.sent_bytes(name, args, kwargs)
                self.bytes[name] = self.bytes.get(name, 0.0) + sent
                self.calls[name] = self.calls.get(name, 0) + 1
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1

        return wrapper

    def sent_bytes(self, name: str, args, kwargs) -> float:
        import torch

        group = kwargs.get("group")
        n = self.dist.get_world_size(group)
        me = self.dist.get_rank(group)

        def nbytes(t) -> int:
            if isinstance(t, torch.Tensor):
                return t.numel() * t.element_size()
            if isinstance(t, (list, tuple)):
                return sum(nbytes(x) for x in t)
            return 0

        if name == "all_to_all_single":
            inp = args[1]
            splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
            rows = inp.shape[0] if inp.dim() else 1
            row_bytes = nbytes(inp) // max(rows, 1)
            mine = splits[me] if splits else rows // n
            return float((rows - mine) * row_bytes)
        if name == "all_to_all":
            inputs = args[1]
            return float(sum(nbytes(t) for r, t in enumerate(inputs) if r != me))
        if name == "all_reduce":
            return 2 * (n - 1) / n * nbytes(args[0])
        if name in ("reduce_scatter_tensor", "reduce_scatter_single"):
            return (n - 1) / n * nbytes(args[1])
        if name == "reduce_scatter":
            return (n - 1) / n * nbytes(args[1])
        if name in ("all_gather_into_tensor", "all_gather_single"):
            return (n - 1) / n * nbytes(args[0])
        if name == "all_gather":
            return (n - 1) / n * nbytes(args[0])
        if name == "reduce":
            dst = args[1] if len(args) > 1 else kwargs.get("dst")
            root = dst if group is None else self.dist.get_group_rank(group, dst)
            return 0.0 if root == me else float(nbytes(args[0]))
        if name == "broadcast":
            return (n - 1) / n * nbytes(args[0])
        if name in ("send", "isend"):
            return float(nbytes(args[0]))
        if name in ("gather", "scatter"):
            return float(nbytes(args[0]))
        return 0.0  # object collectives: pickled sizes are not known here; counted in calls only


# ----------------------------------------------------------------------------- modelled movement
def modelled_moves(owner: dict[str, int], provided: dict[str, list[int]], held: dict[str, list[int]], world: int):
    """Per rank, gradient elements sent to owners (gather) and by owners back to holders (scatter)."""
    sent = [0] * world
    for b, o in owner.items():
        for r in range(world):
            if r != o:
                sent[r] += provided[b][r]
                sent[o] += held[b][r]
    return sent


def tradeoff_rows(pre, world: int) -> list[dict]:
    """Bytes moved against max/mean load for LPT and the locality-aware assignment at each slack."""
    from ds_soo.distributed.assignment import assign_blocks, assign_blocks_local, held_elements

    dims = {b.block_id: b.dims for b in pre.blocks}
    held = held_elements(pre.block_index, pre.layouts, world, "held")
    provided = held_elements(pre.block_index, pre.layouts, world, "provided")
    rows = []
    lpt = assign_blocks(dims, world)
    candidates = [("LPT", lpt)] + [(f"locality, slack {s:g}", assign_blocks_local(dims, held, world, slack=s))
                                   for s in SLACKS]  # fmt: skip
    for label, a in candidates:
        sent = modelled_moves(a.owner, provided, held, world)
        rows.append({"assignment": label, "strategy": a.strategy, "imbalance": a.imbalance,
                     "max_sent_bytes": 4 * max(sent), "total_sent_bytes": 4 * sum(sent)})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- one rank
def _model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=65, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=None,
                     eos_token_id=None)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _batch(step: int, rank: int, world: int):
    import torch

    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 65, (BATCH, 32), generator=g)
    n = BATCH // world
    return ids[rank * n : (rank + 1) * n]


def _precond(method: str) -> dict:
    return {"method": method, "schedule": {"warm_steps": 100, "warm_interval": 1},
            "shampoo": {"max_preconditioner_dim": 128}}  # fmt: skip


def _run_engine(engine: str, method: str, counter: Counter, world: int) -> dict:
    import torch
    import torch.distributed as dist

    from ds_soo import Preconditioner

    rank = dist.get_rank()
    model = _model()
    grad_bytes = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    if engine in ("ddp", "fsdp2"):
        if engine == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        pre = Preconditioner.for_engine(wrapped, _precond(method), optimizer=opt)
    else:
        import deepspeed

        from ds_soo.integrations.deepspeed import attach

        ds_config = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // world,
                     "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                     "zero_allow_untested_optimizer": True, "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
                     "zero_optimization": {"stage": int(engine[-1])}}  # fmt: skip
        wrapped, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        pre = attach(wrapped, _precond(method))
        opt = None
    original = pre.step
    counted = {}

    def counting_step(*a, **k):
        # The second step: the first also verifies and builds the exchange plans, a one-off.
        measure = pre.counters["optimizer_steps"] == 1
        if measure:
            counter.bytes, counter.calls, counter.active = {}, {}, True
        try:
            return original(*a, **k)
        finally:
            if measure:
                counter.active = False
                counted.update(bytes=dict(counter.bytes), calls=dict(counter.calls))

    pre.step = counting_step
    for step in range(2):
        ids = _batch(step, rank, world)
        if opt is not None:
            wrapped(input_ids=ids, labels=ids).loss.backward()
            pre.step()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            wrapped.backward(wrapped(input_ids=ids, labels=ids).loss)
            wrapped.step()
    if pre.counters["preconditioned_steps"] != 2:
        raise RuntimeError(f"{engine}/{method}: preconditioned {pre.counters['preconditioned_steps']} of 2 steps")
    from ds_soo.distributed.assignment import held_elements

    provided = held_elements(pre.block_index, pre.layouts, world, "provided")
    held = held_elements(pre.block_index, pre.layouts, world, "held")
    modelled = modelled_moves(pre.owner_of, provided, held, world)
    out = {"engine": engine, "method": method, "world": world, "grad_bytes": grad_bytes, "blocks": len(pre.blocks),
           "measured": counted, "modelled_lpt_sent_bytes": 4 * modelled[rank],
           "imbalance": pre.assignment.imbalance}  # fmt: skip
    if rank == 0:
        out["tradeoff"] = tradeoff_rows(pre, world)
    pre.remove_hooks()
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, engines: list[str], methods: list[str]) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    code = 0
    try:
        counter = Counter()
        rows = [_run_engine(e, m, counter, world) for e in engines for m in methods]
        counter.restore()
        Path(out_dir, f"{rank}.json").write_text(json.dumps(rows))
        dist.barrier()
    except BaseException:  # noqa: BLE001 - report, then exit non-zero so the launcher stops the other ranks
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # avoids torch/gloo's sporadic abort at interpreter shutdown


def measure(world: int, engines: list[str], methods: list[str] = METHODS, timeout: float = 900) -> list[list[dict]]:
    """Run the ranks as fresh interpreters (``python -c``), so this works from any importer; per-rank rows."""
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
        call = f"{world}, {port}, {tmp!r}, {list(engines)!r}, {list(methods)!r}"
        code = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import comm_bytes; "
                f"comm_bytes._worker(int(sys.argv[1]), {call})")  # fmt: skip
        procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, cwd=ROOT) for r in range(world)]
        deadline = time.monotonic() + timeout
        try:
            # A rank that fails leaves its peers waiting in a collective: stop them all.
            while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            codes = [p.poll() if p.poll() is not None else "killed" for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(c != 0 for c in codes):
            raise RuntimeError(f"ranks exited with {codes}")
        return [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]


# ----------------------------------------------------------------------------- tables
def engine_sync(engine: str, n: int) -> float:
    """The engine's own gradient reduction per rank, as a multiple of G (ring; ZeRO-3/FSDP2 also all-gather
    parameters, not counted)."""
    return 2 * (n - 1) / n if engine == "ddp" else (n - 1) / n


def tables(per_world: dict[int, list[list[dict]]]) -> str:
    lines = ["### Bytes each rank sends in pre.step(), measured on gloo, as a multiple of G (model fp32 grads)\n",
             "| engine | method | N | blocks | max over ranks | mean | all-to-all | factor reduce | all_reduce "
             "| other | all-to-all - modelled LPT moves | engine's own grad sync (ring) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    trade = ["### Locality trade-off (modelled from the layouts): gradient bytes moved against load\n",
             "| engine | method | N | assignment | max/mean load | max sent / G | total sent / G |",
             "|---|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for world, ranks in per_world.items():
        for i, row in enumerate(ranks[0]):
            g = row["grad_bytes"]
            per_rank = [sum(r[i]["measured"]["bytes"].values()) for r in ranks]
            kinds = {"a2a": 0.0, "reduce": 0.0, "allreduce": 0.0, "other": 0.0}
            for r in ranks:
                for name, b in r[i]["measured"]["bytes"].items():
                    key = ("a2a" if name.startswith("all_to_all") else "reduce" if name.startswith("reduce")
                           else "allreduce" if name == "all_reduce" else "other")  # fmt: skip
                    kinds[key] += b / len(ranks)
            extra = max(r[i]["measured"]["bytes"].get("all_to_all_single", 0.0) - r[i]["modelled_lpt_sent_bytes"]
                        for r in ranks)  # fmt: skip
            lines.append(
                f"| {row['engine']} | {row['method']} | {world} | {row['blocks']} | {max(per_rank) / g:.2f} "
                f"| {sum(per_rank) / len(per_rank) / g:.2f} | {kinds['a2a'] / g:.2f} | {kinds['reduce'] / g:.2f} "
                f"| {kinds['allreduce'] / g:.3f} | {kinds['other'] / g:.2f} | {extra:.0f} B "
                f"| {engine_sync(row['engine'], world):.2f} |"
            )
            for t in row["tradeoff"]:
                trade.append(
                    f"| {row['engine']} | {row['method']} | {world} | {t['assignment']}"
                    f"{'' if t['strategy'] in ('lpt', 'locality') else ' (fell back to LPT)'} "
                    f"| {t['imbalance']:.2f} | {t['max_sent_bytes'] / g:.2f} | {t['total_sent_bytes'] / g:.2f} |"
                )
    notes = ("\nall-to-all - modelled: measured all-to-all bytes beyond the gradient elements the layouts say must"
             " move (the per-(block, peer) flags). G is the whole model's fp32 gradient.")  # fmt: skip
    return "\n".join(lines) + notes + "\n\n" + "\n".join(trade)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    per_world = {w: measure(w, args.engines, args.methods) for w in args.worlds}
    print(tables(per_world))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({str(w): r for w, r in per_world.items()}, indent=2))
    return per_world


if __name__ == "__main__":
    main()
