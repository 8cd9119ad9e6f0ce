"""Inverse p-th roots of Shampoo-like statistics: eigh (fp32) against the coupled Newton iteration (fp32).

Newton goes through ``ds_soo.curvature.linalg.inverse_root(..., method="newton")`` (with its eigh
fallback); eigh is ``eigh_root`` here, the same computation as ``inverse_root``'s eigh path, batched
(one ``torch.linalg.eigh`` call per stack). Both run on stacks of ``batch`` equal-sized matrices, as
Shampoo refreshes them. Per (p, size, batch): median time per matrix, the largest relative Frobenius error over the
stack against a float64 eigh reference, and the Newton iterations run (``auto_iters``) and accepted.

The matrices are Shampoo's left statistics L = sum_k G_k G_k^T over ``--steps`` gradients G_k (n x n)
that share a decaying rank-n/4 subspace plus 1e-3 noise, scaled so that the top eigenvalue is
``--lmax``; the damping is added absolutely, as ``ShampooBlock.refresh`` does (default 1e-6, ds_soo's
Shampoo default), so the damped condition number is about lmax / damping.

The rule printed at the end is computed from the table: per (p, batch), the smallest size from which
Newton is faster at every measured size and its error stays within max(2 x eigh's, ``--err-tol``).

    python bench/inverse_roots.py [--device cuda] [--sizes 64 128 256] [--batches 1 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from ds_soo.curvature.iterative_roots import auto_iters, coupled_newton_inverse_root, eigenvalue_upper_bound
from ds_soo.curvature.linalg import inverse_root

CPU_SIZES = [64, 128, 256, 384, 768]
CUDA_SIZES = [64, 128, 256, 384, 768, 1536]
METHODS = ("eigh", "newton")


def statistics_stack(n: int, batch: int, steps: int, lmax: float, seed: int) -> torch.Tensor:
    """(batch, n, n) float64 Shampoo left statistics (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    r = max(1, n // 4)
    out = []
    for _ in range(batch):
        basis = torch.randn(n, r, generator=g, dtype=torch.float64) * torch.logspace(0, -2, r, dtype=torch.float64)
        stat = torch.zeros(n, n, dtype=torch.float64)
        for _ in range(steps):
            grad = basis @ torch.randn(r, n, generator=g, dtype=torch.float64)
            grad += 1e-3 * torch.randn(n, n, generator=g, dtype=torch.float64)
            stat += grad @ grad.T
        out.append(stat / torch.linalg.eigvalsh(stat)[-1] * lmax)
    return torch.stack(out)


def reference_root(stats: torch.Tensor, p: int, damping: float) -> torch.Tensor:
    """float64 eigh root, clamped at zero before damping as ``inverse_root`` does."""
    return eigh_root(stats.double(), p, damping)


def eigh_root(stats: torch.Tensor, p: int, damping: float) -> torch.Tensor:
    """fp32 (stats + damping I)^(-1/p) by one batched eigh, eigenvalues clamped at zero before damping."""
    w, v = torch.linalg.eigh(0.5 * (stats + stats.transpose(-1, -2)))
    return (v * (w.clamp_min(0.0) + damping).pow(-1.0 / p).unsqueeze(-2)) @ v.transpose(-1, -2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, reps: int, budget_s: float) -> tuple[float, object]:
    """Median seconds per call over up to ``reps`` calls (fewer once ``budget_s`` is spent; at least one)."""
    times, out = [], None
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if sum(times) > budget_s:
            break
    return statistics.median(times), out


def _call(method: str, stats: torch.Tensor, p: int, damping: float) -> torch.Tensor | None:
    if method == "eigh":
        out = eigh_root(stats, p, damping)
        return out if bool(torch.isfinite(out).all()) else None  # the host read inverse_root makes too
    return inverse_root(stats, p, damping, method="newton")


def measure(args, device: torch.device) -> list[dict]:
    rows = []
    warm = statistics_stack(8, 2, 2, args.lmax, 0).float().to(device)
    for m in METHODS:  # one-time set-up (solver handles, thread pools) outside the timings
        _call(m, warm, 4, args.damping)
    for p in args.roots:
        for n in args.sizes:
            for batch in args.batches:
                if batch > 1 and n > args.max_batched_size:
                    continue
                stats64 = statistics_stack(n, batch, args.steps, args.lmax, seed=n * 1000 + batch)
                ref = reference_root(stats64, p, args.damping)
                stats = stats64.float().to(device)
                damped = stats + args.damping * torch.eye(n, device=device)
                ratio = float((args.damping / eigenvalue_upper_bound(damped)).amin())
                newton = coupled_newton_inverse_root(stats, p, args.damping)
                for m in METHODS:
                    call = functools.partial(_call, m, stats, p, args.damping)
                    sec, out = _time(call, device, args.reps, args.budget)
                    if out is None:
                        err = float("inf")
                    else:
                        diff = torch.linalg.matrix_norm(out.double().cpu() - ref)
                        err = float((diff / torch.linalg.matrix_norm(ref)).max())
                    row = {"method": m, "p": p, "size": n, "batch": batch, "ms_per_matrix": 1e3 * sec / batch,
                           "max_rel_err": err}  # fmt: skip
                    if m == "newton":
                        row.update(iters_run=auto_iters(p, ratio), iters_accepted=int(newton.iters.max()),
                                   converged=f"{int(newton.ok.sum())}/{batch}")  # fmt: skip
                    rows.append(row)
                    print(_row(row), flush=True)
    return rows


HEADER = ("| method | p | size | batch | ms / matrix | max rel err | iters run / accepted | converged |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip


def _row(r: dict) -> str:
    iters = f"{r['iters_run']} / {r['iters_accepted']}" if "iters_run" in r else ""
    return (f"| {r['method']} fp32 | {r['p']} | {r['size']} | {r['batch']} | {r['ms_per_matrix']:.3f} | "
            f"{r['max_rel_err']:.1e} | {iters} | {r.get('converged', '')} |")  # fmt: skip


def choice_rule(rows: list[dict], err_tol: float) -> dict[str, int | None]:
    """Per "p=.., batch=..": the smallest size from which Newton wins at every larger measured size, or None."""
    by = {(r["p"], r["batch"], r["size"], r["method"]): r for r in rows}
    rule: dict[str, int | None] = {}
    for p, batch in sorted({(r["p"], r["batch"]) for r in rows}):
        sizes = sorted({r["size"] for r in rows if (r["p"], r["batch"]) == (p, batch)})
        wins = []
        for n in sizes:
            e, nw = by[(p, batch, n, "eigh")], by[(p, batch, n, "newton")]
            ok = nw["max_rel_err"] <= max(2.0 * e["max_rel_err"], err_tol)
            wins.append(ok and nw["ms_per_matrix"] < e["ms_per_matrix"])
        first = None
        for i in range(len(sizes) - 1, -1, -1):
            if not wins[i]:
                break
            first = sizes[i]
        rule[f"p={p}, batch={batch}"] = first
    return rule


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help=f"default: cpu {CPU_SIZES}, cuda {CUDA_SIZES}")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: cpu 1 8, cuda 1 8 64")
    ap.add_argument("--max-batched-size", type=int, default=None,
                    help="stacks of more than one matrix only up to this size (default: cpu 256, cuda 768)")
    ap.add_argument("--roots", type=int, nargs="+", default=[4, 2], help="p of (L + damping I)^(-1/p)")
    ap.add_argument("--damping", type=float, default=1e-6)
    ap.add_argument("--lmax", type=float, default=1.0, help="top eigenvalue of the statistics")
    ap.add_argument("--steps", type=int, default=8, help="gradients summed into each statistic")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.0, help="stop repeating a timing after this many seconds")
    ap.add_argument("--err-tol", type=float, default=1e-3, help="Newton error always acceptable below this")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    args.sizes = args.sizes or (CUDA_SIZES if cuda else CPU_SIZES)
    args.batches = args.batches or ([1, 8, 64] if cuda else [1, 8])
    args.max_batched_size = args.max_batched_size or (768 if cuda else 256)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"## Inverse roots on {name}: damping {args.damping:g}, top eigenvalue {args.lmax:g}\n\n{HEADER}")
    rows = measure(args, device)
    rule = choice_rule(rows, args.err_tol)
    print(f"\nSuggested choice (newton from this size on; error within max(2x eigh, {args.err_tol:g})):")
    for key, size in rule.items():
        print(f"  {key}: " + (f"newton for n >= {size}, eigh below" if size else "eigh at every measured size"))
    res = {"device": name, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "rows": rows, "rule": rule}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
