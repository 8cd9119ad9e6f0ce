"""Optimizer and curvature state of every method on the anchor models, counted exactly on any device.

State sizes do not depend on the batch or the device, so this needs no GPU: each method builds the
anchor model (``--preset gpu``: char-GPT 6 x 384, T=256, and ViT-S/16 at 224 px), takes two steps on
``--batch`` real examples with a refresh on each, and counts the bytes of every tensor reachable from
its optimizer and preconditioner that the model does not own (``peers.state_bytes``: moments,
factors, roots, index tensors). ds_soo's rows also split that into curvature statistics, roots and
inverses, grafting state, and the rest (the outer optimizer's momentum and any index tensors).
``shampoo-dense`` is ds_soo's Shampoo with ``pack_statistics: false``, for the packing's effect.

    python bench/state_memory.py --preset gpu --workload vit gpt --json out/state.json
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

METHODS = (*peers.METHODS, *peers.VARIANTS)
STATISTICS = ("a", "g", "left", "right")
ROOTS = ("a_inv", "g_inv", "left_root", "right_root", "ql", "qr", "q")
MiB = 2**20


def split_ds_soo(pre) -> dict[str, int]:
    """ds_soo's own state by kind: statistics, roots/inverses (PSGD's Q included) and grafting."""
    out = {"statistics": 0, "roots": 0, "grafting": 0}
    for state in pre.states.values():
        for kind, attrs in (("statistics", STATISTICS), ("roots", ROOTS), ("grafting", ("graft_v",))):
            for attr in attrs:
                t = getattr(state, attr, None)
                if isinstance(t, torch.Tensor):
                    out[kind] += t.numel() * t.element_size()
    return out


def measure(method: str, w: peers.Workload, batch: dict, meta: tuple[int, int], device: torch.device) -> dict:
    gc.collect()
    model = peers.build_model(w, *meta).to(device)
    runner = peers.make_runner(method, model, 1, device)
    for _ in range(2):
        for p in model.parameters():
            p.grad = None
        peers.model_loss(model, batch).backward()
        runner.step()
    problem = runner.check()
    if problem:
        raise RuntimeError(f"{method}: {problem}")
    row = {"state_bytes": peers.state_bytes(runner.holders, model)}
    pre = next((h for h in runner.holders if hasattr(h, "states") and hasattr(h, "cfg")), None)
    if pre is not None:
        row.update(split_ds_soo(pre))
        row["rest"] = row["state_bytes"] - row["statistics"] - row["roots"] - row["grafting"]
    return row


def table(w: peers.Workload, rows: dict[str, dict]) -> str:
    what = (f"char-GPT {w.layers}x{w.hidden}, T={w.seq}" if w.kind == "gpt"
            else f"ViT {w.layers}x{w.hidden}, {w.image} px, patch {w.patch}")  # fmt: skip
    lines = [f"### {what}: state (MiB)\n",
             "| method | state | / AdamW | / Meta Shampoo | statistics | roots, inverses | grafting | rest |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    adam = rows["adamw"].get("state_bytes")
    meta = rows.get("meta-shampoo", {}).get("state_bytes")
    for m, r in rows.items():
        if "state_bytes" not in r:
            lines.append(f"| {m} | {r.get('status', 'n/a')} | | | | | | |")
            continue
        s = r["state_bytes"]
        parts = [f"{r[k] / MiB:.1f}" if k in r else "" for k in ("statistics", "roots", "grafting", "rest")]
        vs_meta = f"{s / meta:.2f}" if meta else "n/a"
        lines.append(f"| {m} | {s / MiB:.1f} | {s / adam:.2f} | {vs_meta} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(peers.PRESETS), default="gpu")
    p.add_argument("--workload", nargs="+", choices=["gpt", "vit"], default=["gpt", "vit"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="adamw (the ratio baseline) is always counted")  # fmt: skip
    p.add_argument("--batch", type=int, default=2, help="examples per step (state does not depend on it)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=None, help="data folder (default $DS_SOO_DATA or ../shared/data)")
    peers.add_peer_args(p)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.methods = peers.with_baseline(args.methods)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    status = peers.load_peers(args)
    report: dict = {"preset": args.preset, "peers": status, "workloads": []}
    for kind in args.workload:
        w = peers.PRESETS[args.preset][kind]
        w = peers.Workload(w.kind, w.layers, w.hidden, args.batch, w.seq, w.image, w.patch)
        batches, vocab, classes = peers.load_batches(w, 1, device, peers.data_dir(args.data))
        rows: dict[str, dict] = {}
        for m in args.methods:
            if m in peers.PEERS and status.get(m) != "ok":
                rows[m] = {"status": status.get(m, "missing")}
                continue
            rows[m] = measure(m, w, batches[0], (vocab, classes), device)
        print(table(w, rows) + "\n", flush=True)
        report["workloads"].append({"workload": w.kind, "preset": args.preset, "methods": rows})
    peers.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
