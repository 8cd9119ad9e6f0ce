"""What one optimizer step launches: aten ops and host syncs per method and peer, counted on the CPU.

On a GPU a second-order step at these sizes costs what it launches, not what it computes: every aten op
is a kernel launch (or at least a dispatcher round trip) and every host sync stalls the stream. Both are
counted exactly here, with no GPU, by a ``TorchDispatchMode`` around the optimizer step only
(preconditioner plus base optimizer; forward and backward are not counted):

- ops: every aten op dispatched, and the ones that launch work, i.e. without views and metadata ops
  (view, reshape aliases, slice, select, permute, transpose, expand, unbind, split, detach, alias, ...);
- host syncs: ``aten._local_scalar_dense`` (``.item()``, ``float()``, ``bool()`` of a tensor) plus
  ``.tolist()`` calls (which read a CPU tensor without dispatching; on a GPU they are a copy to the host);
- host ms: the median wall time of the same step without the counting mode, at these tiny sizes mostly
  Python and dispatcher overhead, the part a GPU cannot hide.

Counts depend on the parameter shapes and the schedule, not on batch or sequence length, so the anchor
structures (char-GPT 6 x 384, T = 256; ViT-S/16 at 224 px) run at batch 1. Every method refreshes every
``--interval`` steps with statistics every step (as ``bench/peers.py``); the sparse step is step 1, the
refresh step is step ``interval`` (the second refresh: the first also allocates state). Models, methods
and peer settings are ``bench/peers.py``'s; AdamW is the multi-tensor (``foreach``) one, whose CPU step
counters still cost one host sync per parameter.

    python bench/launches.py                      # both anchors, every method and peer
    python bench/launches.py --preset tiny        # seconds: what the test suite runs
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

WORKLOADS = {
    "anchor": {"gpt": peers.Workload("gpt", 6, 384, 1, seq=256),
               "vit": peers.Workload("vit", 12, 384, 1, image=224, patch=16)},
    "tiny": {"gpt": peers.Workload("gpt", 2, 64, 1, seq=16), "vit": peers.Workload("vit", 2, 64, 1, image=16, patch=4)},
}  # fmt: skip
VOCAB, CLASSES = 65, 10  # Tiny Shakespeare's characters, CIFAR-10's classes
# Ops that only make a new view or read metadata: no kernel on any device.
VIEW_OPS = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "reshape", "slice", "select", "permute", "transpose", "t",
    "expand", "unbind", "split", "split_with_sizes", "chunk", "detach", "alias", "as_strided", "squeeze",
    "unsqueeze", "narrow", "diagonal", "view_as", "expand_as", "unflatten", "flatten", "lift_fresh", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
})  # fmt: skip
SYNC_OPS = frozenset({"_local_scalar_dense"})


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_tolist() -> Iterator[list[int]]:
    """Counts ``Tensor.tolist`` calls (a host read that dispatches no aten op for a CPU tensor)."""
    calls = [0]
    original = torch.Tensor.tolist

    def tolist(self, *a, **k):
        calls[0] += 1
        return original(self, *a, **k)

    torch.Tensor.tolist = tolist
    try:
        yield calls
    finally:
        torch.Tensor.tolist = original


@dataclass
class StepCount:
    all_ops: int
    launching_ops: int
    host_syncs: int
    top: list[tuple[str, int]] = field(default_factory=list)


def count(ops: collections.Counter[str], tolists: int) -> StepCount:
    launching = sum(n for name, n in ops.items() if name not in VIEW_OPS)
    syncs = sum(n for name, n in ops.items() if name in SYNC_OPS) + tolists
    return StepCount(sum(ops.values()), launching, syncs, ops.most_common(6))


@dataclass
class Row:
    method: str
    status: str = "ok"
    sparse: StepCount | None = None
    refresh: StepCount | None = None
    host_ms: float | None = None


def batch_for(w: peers.Workload) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if w.kind == "gpt":
        ids = torch.randint(0, VOCAB, (w.batch, w.seq + 1), generator=g)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    return {"pixel_values": torch.randn(w.batch, 3, w.image, w.image, generator=g),
            "labels": torch.randint(0, CLASSES, (w.batch,), generator=g)}  # fmt: skip


def measure(method: str, w: peers.Workload, interval: int, timed: int) -> Row:
    """Counts of step 1 (sparse) and step ``interval`` (refresh); the median host time of later sparse steps."""
    model = peers.build_model(w, VOCAB, CLASSES)
    if method == "adamw":  # the multi-tensor AdamW (bench/peers.py's CPU AdamW is the per-parameter loop)
        opt = torch.optim.AdamW(model.parameters(), lr=peers.LR, foreach=True)
        runner = peers.Runner(opt.step, [opt])
    else:
        runner = peers.make_runner(method, model, interval, torch.device("cpu"))
    batch = batch_for(w)
    row = Row(method)
    times = []
    for step in range(interval + 1 + timed):
        for p in model.parameters():
            p.grad = None
        peers.model_loss(model, batch).backward()
        if step in (1, interval):
            with counting_tolist() as tolists, CountOps() as mode:
                runner.step()
            c = count(mode.ops, tolists[0])
            if step == 1:
                row.sparse = c
            else:
                row.refresh = c
        else:
            t0 = time.perf_counter()
            runner.step()
            if step > interval and step % interval:
                times.append(time.perf_counter() - t0)
    problem = runner.check()
    if problem:
        raise RuntimeError(f"{method}: {problem}")
    row.host_ms = 1e3 * statistics.median(times) if times else None
    return row


def table(kind: str, w: peers.Workload, rows: list[Row]) -> str:
    base = next((r for r in rows if r.method == "adamw" and r.sparse), None)
    shape = f"seq {w.seq}" if w.kind == "gpt" else f"{w.image} px / {w.patch}"
    lines = [
        f"{kind}: {w.layers} x {w.hidden}, {shape}; ops of one optimizer step (launching / all), host syncs, "
        "median host ms of a sparse step",
        "",
        "| method | sparse step: ops | syncs | refresh step: ops | syncs | host ms | ops vs AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.sparse is None:
            lines.append(f"| {r.method} | {r.status} | | | | | |")
            continue
        ratio = f"{r.sparse.launching_ops / base.sparse.launching_ops:.1f}x" if base else "n/a"
        ref = r.refresh
        lines.append(
            f"| {r.method} | {r.sparse.launching_ops} / {r.sparse.all_ops} | {r.sparse.host_syncs} "
            f"| {ref.launching_ops} / {ref.all_ops} | {ref.host_syncs} | {r.host_ms:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(WORKLOADS), default="anchor")
    p.add_argument("--workload", nargs="+", choices=["gpt", "vit"], default=["gpt", "vit"])
    p.add_argument("--methods", nargs="+", choices=peers.METHODS, default=list(peers.METHODS))
    p.add_argument("--interval", type=int, default=10, help="refresh interval of every method")
    p.add_argument("--timed", type=int, default=5, help="untimed-by-count steps whose host time is measured")
    peers.add_peer_args(p)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: host time without thread noise)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.methods = peers.with_baseline(args.methods)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    status = peers.load_peers(args) if any(m in peers.PEERS for m in args.methods) else {}
    report: dict = {"preset": args.preset, "interval": args.interval, "workloads": {}}
    for kind in args.workload:
        w = WORKLOADS[args.preset][kind]
        rows = []
        for method in args.methods:
            if method in peers.PEERS and status.get(method) != "ok":
                rows.append(Row(method, status.get(method, "not loaded")))
                continue
            try:
                rows.append(measure(method, w, args.interval, args.timed))
            except Exception as e:  # a peer that breaks is reported, ds_soo and AdamW must not
                if method not in peers.PEERS:
                    raise
                rows.append(Row(method, f"failed: {type(e).__name__}: {e}"))
        print(table(kind, w, rows) + "\n", flush=True)
        report["workloads"][kind] = {"workload": asdict(w), "rows": [asdict(r) for r in rows]}
    peers.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
