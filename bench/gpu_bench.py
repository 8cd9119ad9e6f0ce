"""Correctness on the device first, then the performance targets table, in one process.

1. Checks: every ds_soo method's step on the device (fp32) against the same step in float64 on the
   CPU (model, gradients and inverses in float64), and the independent dense float64 references of
   ``bench/gpu_check.py`` (K-FAC by the dense Kronecker solve, Shampoo by eigh roots). A failed check
   stops the run before any timing.
2. Targets (the performance issue's table), as ratios to ``AdamW`` (fused on CUDA) in this process:
   - sparse step median and warm-phase mean (refresh every ``--interval`` steps), K-FAC, Shampoo,
     PSGD and Meta's Shampoo, measured by ``bench/peers.py``'s interleaved timing;
   - whole run with ds_soo's default schedule (``--run-steps`` steps), mean step;
   - largest step after the warm phase of that run, against its median;
   - char-GPT wall clock (training steps only, evaluation excluded) to validation loss ``--target``;
   - curvature state: ds_soo Shampoo against Meta's on the ViT workload.
3. With ``--roots``, before the targets: inverse roots of Shampoo-like statistics, eigh against the
   coupled Newton iteration, per size and stack size (``bench/inverse_roots.py``'s default table).

    python bench/gpu_bench.py --preset gpu                      # the anchors, on CUDA
    python bench/gpu_bench.py --preset tiny --device cpu --target-steps 20   # the CPU smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (bench/ is not a package)
import inverse_roots  # noqa: E402
import peers  # noqa: E402

SECOND_ORDER = ("kfac", "shampoo", "psgd")
# Learning rates for time-to-target: the char-GPT compare runs of configs/shakespeare_gpt.yaml.
TARGET_LR = {"adamw": 1e-3, "kfac": 0.05, "shampoo": 1e-3, "meta-shampoo": 1e-3}
CHECK_TOL = {"kfac": 1e-3, "shampoo": 1e-3, "psgd": 1e-3}


# ----------------------------------------------------------------------------- 1. checks
def _check_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6))


def _run_steps(method: str, device: torch.device, dtype: torch.dtype, steps: int = 3,
               stats_matmul: str = "float32") -> list[torch.Tensor]:  # fmt: skip
    """``steps`` preconditioned SGD steps (refresh every step); the preconditioned gradients of each step."""
    from ds_soo import Preconditioner

    model = _check_model().to(device=device, dtype=dtype)
    numerics = {"inverse_dtype": "float64" if dtype == torch.float64 else "float32", "stats_matmul": stats_matmul}
    cfg = {"method": method, "schedule": {"warm_steps": 100, "warm_interval": 1},
           "damping": {"value": 1e-3}, "numerics": numerics}  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pre = Preconditioner(model, cfg, optimizer=opt)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x, y = torch.randn(64, 12, generator=g), torch.randn(64, 6, generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x.to(device, dtype)), y.to(device, dtype)).backward()
        torch.manual_seed(123)  # PSGD draws its probe vectors from the CPU generator: same on both runs
        pre.step()
        out.append(torch.cat([p.grad.detach().reshape(-1).double().cpu() for p in model.parameters()]))
        opt.step()
    if pre.counters["preconditioned_steps"] != steps:
        raise RuntimeError(f"{method}: preconditioned {pre.counters['preconditioned_steps']} of {steps} steps")
    return out


def device_checks(device: torch.device) -> bool:
    print(f"## Checks on {peers.device_name(device)}\n\n| check | result | detail |\n|---|---|---|")
    for method in SECOND_ORDER:
        got = _run_steps(method, device, torch.float32)
        want = _run_steps(method, torch.device("cpu"), torch.float64)
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want, strict=True))
        gpu_check.check(f"ds_soo {method}: 3 steps on {device.type} (fp32) = CPU float64", err < CHECK_TOL[method],
                        f"max rel err {err:.1e} (tolerance {CHECK_TOL[method]:.0e})")  # fmt: skip
        if device.type == "cuda":  # the default statistics precision: reported, not a gate
            low = _run_steps(method, device, torch.float32, stats_matmul="tf32")
            err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(low, want, strict=True))
            print(f"| ds_soo {method}: same, TF32 statistics (the CUDA default) | info | max rel err {err:.1e} |")
    gpu_check.correctness(device)
    return not gpu_check.FAILED


# ----------------------------------------------------------------------------- 2. targets
STAGGERED = ("kfac", "shampoo")  # whole runs repeated with schedule.stagger false: all blocks refresh together
UNSTAGGERED = "{} stagger off"


def whole_run(method: str, w: peers.Workload, batches, meta, args, device, stagger: bool | None = None) -> peers.Result:
    """``--run-steps`` steps with ds_soo's default schedule (total_steps known), every step timed.

    ``stagger`` overrides the schedule's default (``"sparse"``: blocks spread over the sparse interval)."""
    run_args = argparse.Namespace(**{**vars(args), "warmup": 0, "steps": args.run_steps})
    schedule = {"total_steps": args.run_steps} if method in SECOND_ORDER else None
    if schedule is not None and stagger is not None:
        schedule["stagger"] = stagger
    return peers.run_method(method, w, batches, meta, run_args, device, schedule)


def warm_steps_of_default(total: int) -> int:
    from ds_soo.config import ScheduleConfig
    from ds_soo.schedule import CurvatureSchedule

    return CurvatureSchedule(ScheduleConfig(total_steps=total)).warm_steps or 0


def time_to_target(method: str, w: peers.Workload, args, device) -> dict:
    """Train char-GPT from scratch until the validation loss reaches ``--target``; training wall clock only."""
    data = peers.char_data(w, peers.data_dir(args.data), eval_windows=args.eval_windows)
    model = peers.build_model(w, data.vocab_size, 0).to(device)
    schedule = {"total_steps": args.target_steps} if method in SECOND_ORDER else None
    runner = peers.make_runner(method, model, args.interval, device, schedule, lr=TARGET_LR[method])
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    evals = [{k: v.to(device) for k, v in b.items()} for b in data.eval_batches(w.batch)]
    train = data.train_batches(w.batch, seed=0)
    clock, best, reached = 0.0, float("inf"), None
    for step in range(1, args.target_steps + 1):
        batch = {k: v.to(device) for k, v in next(train).items()}
        peers.sync(device)
        t0 = time.perf_counter()
        for p in model.parameters():
            p.grad = None
        with amp:
            loss = peers.model_loss(model, batch)
        loss.backward()
        runner.step()
        peers.sync(device)
        clock += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.target_steps:
            model.eval()
            with torch.no_grad(), amp:
                val = statistics.fmean(float(peers.model_loss(model, b)) for b in evals)
            model.train()
            best = min(best, val)
            if not math.isfinite(val):
                break
            if val <= args.target:
                reached = step
                break
    return {"method": method, "seconds": clock if reached else None, "steps": reached, "best_val": best,
            "clock_at_stop": clock}  # fmt: skip


def targets(args, device, status) -> dict:
    out: dict = {"device": peers.device_name(device), "workloads": {}}
    for kind in args.workload:
        w = peers.PRESETS[args.preset][kind]
        # Every peer that imported is timed beside ds_soo; the targets table shows Meta's Shampoo, the
        # per-method table below it all of them.
        methods = ["adamw", *SECOND_ORDER, *peers.VARIANTS] + [m for m in peers.PEERS if status.get(m) == "ok"]
        if args.whole_run_only:
            out["workloads"][kind] = {"warm": {"methods": {}}}
        else:
            warm = peers.bench_workload(w, methods, status, args, device)
            print(peers.table(w, warm, out["device"]) + "\n", flush=True)
            out["workloads"][kind] = {"warm": peers.to_json(w, warm)}
        peers.write_json(args.json, out)  # a run cut short still leaves what it measured
        entry = out["workloads"][kind]
        if args.run_steps > 0 and kind in (args.run_workloads or args.workload):
            batches, vocab, classes = peers.load_batches(w, args.batches, device, peers.data_dir(args.data))
            warm_steps = warm_steps_of_default(args.run_steps)
            ws = max(warm_steps - 1, 0)  # the first sparse step's index in times[1:]
            entry.update({"whole_run": {}, "warm_steps_of_default": warm_steps})
            # The first step of each run carries one-time set-up (lazy init, kernel selection), not the method.
            base = whole_run("adamw", w, batches, (vocab, classes), args, device).times[1:]
            base_mean, base_median = statistics.fmean(base), statistics.median(base)
            plan = [(m, None) for m in args.run_methods]
            plan += [(m, False) for m in STAGGERED if m in args.run_methods]
            for m, stagger in plan:
                t = whole_run(m, w, batches, (vocab, classes), args, device, stagger=stagger).times[1:]
                first = ws if len(t) > ws + 1 else 0
                after = t[first:]
                # The largest step's 0-based index in the run: on the statistics grid (every 10 steps from
                # the warm phase's end) or a refresh step, it says which of the two made the spike.
                name = m if stagger is None else UNSTAGGERED.format(m)
                median_after = statistics.median(after)
                # after_warm_median: the default schedule's typical step (statistics every 10 steps, refreshes
                # rare), the sparse-step figure as a user of the defaults meets it.
                entry["whole_run"][name] = {"mean_ratio": statistics.fmean(t) / base_mean,
                                            "after_warm_median": median_after / base_median,
                                            "spike": max(after) / median_after,
                                            "largest_at": 1 + first + after.index(max(after))}  # fmt: skip
                peers.write_json(args.json, out)  # each run as it finishes: a run cut short keeps the others
            print(f"{kind}: whole run of {args.run_steps} steps (warm phase {warm_steps}): "
                  + ", ".join(f"{m} mean {v['mean_ratio']:.2f}x, median after warm {v['after_warm_median']:.2f}x, "
                              f"spike {v['spike']:.2f}x at step {v['largest_at']}"
                              for m, v in entry["whole_run"].items()), flush=True)  # fmt: skip
            peers.write_json(args.json, out)
        if kind == "gpt" and args.target_steps > 0:
            entry["time_to_target"] = {}
            for m in args.target_methods:
                if m != "meta-shampoo" or status.get(m) == "ok":
                    entry["time_to_target"][m] = r = time_to_target(m, w, args, device)
                    print(f"time to val loss {args.target}: {m} {r}", flush=True)
                    peers.write_json(args.json, out)
    return out


def _cell(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "n/a"


def _ratio(methods: dict, m: str, key: str) -> float | None:
    return methods.get(m, {}).get("ratio", {}).get(key)


def _reached(r: dict | None, base: float | None) -> str:
    if r is None:
        return "n/a"
    if r["seconds"] is None:
        return f"not reached (best {r['best_val']:.2f})"
    return f"{r['seconds'] / base:.2f}x ({r['seconds']:.1f} s)" if base else f"{r['seconds']:.1f} s"


def targets_table(res: dict, target: float) -> str:
    lines = [f"## Targets on {res['device']} (ratios to AdamW in the same process)\n",
             "| workload | figure | target | K-FAC | Shampoo | PSGD | Meta Shampoo |",
             "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    timed = (*SECOND_ORDER, "meta-shampoo")
    for kind, e in res["workloads"].items():
        ms, wr = e["warm"]["methods"], e.get("whole_run")
        for label, goal, key in (("sparse step, median", "<= 1.10x", "sparse_median"),
                                 ("warm phase (refresh every 10), mean", "<= 1.5x", "warm_mean")):  # fmt: skip
            cells = " | ".join(_cell(_ratio(ms, m, key)) for m in timed)
            lines.append(f"| {kind} | {label} | {goal} | {cells} |")
        for label, goal, key in (("whole run, default schedule, mean", "<= 1.05x", "mean_ratio"),
                                 ("default schedule after warm, median step", "<= 1.10x", "after_warm_median"),
                                 ("largest step after warm / median", "<= 3x", "spike")):  # fmt: skip
            cells = " | ".join(_cell(wr[m][key] if wr and m in wr else None) for m in SECOND_ORDER)
            lines.append(f"| {kind} | {label} | {goal} | {cells} | n/a |")
            if wr and any(UNSTAGGERED.format(m) in wr for m in STAGGERED):
                cells = " | ".join(_cell(wr[UNSTAGGERED.format(m)][key]) if UNSTAGGERED.format(m) in wr else ""
                                   for m in SECOND_ORDER)  # fmt: skip
                lines.append(f"| {kind} | {label}, `stagger: false` | {goal} | {cells} | |")
        if "time_to_target" in e:
            tt = e["time_to_target"]
            adam = tt["adamw"]
            base = adam["seconds"]
            adam_txt = f"{base:.1f} s" if base is not None else f"not reached (best {adam['best_val']:.2f})"
            lines.append(f"| {kind} | time to val loss {target} (AdamW {adam_txt}) | <= 0.7x | "
                         f"{_reached(tt.get('kfac'), base)} | {_reached(tt.get('shampoo'), base)} | n/a "
                         f"| {_reached(tt.get('meta-shampoo'), base)} |")  # fmt: skip
        if kind == "vit":
            sh, meta = ms.get("shampoo", {}), ms.get("meta-shampoo", {})
            if sh.get("state_bytes") and meta.get("state_bytes"):
                lines.append(f"| vit | Shampoo state vs Meta's | <= 1.00x | | "
                             f"{sh['state_bytes'] / meta['state_bytes']:.2f}x ({sh['state_bytes'] / 2**20:.0f} "
                             f"vs {meta['state_bytes'] / 2**20:.0f} MiB) | | |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peers.add_common_args(p)
    p.set_defaults(preset="gpu")
    p.add_argument("--run-steps", type=int, default=400, help="steps of the default-schedule run (0: skip)")
    p.add_argument("--run-workloads", nargs="+", choices=["gpt", "vit"], default=None,
                   help="workloads of the default-schedule runs (default: every --workload)")
    p.add_argument("--run-methods", nargs="+", choices=SECOND_ORDER, default=list(SECOND_ORDER))
    p.add_argument("--target-methods", nargs="+", choices=list(TARGET_LR), default=list(TARGET_LR))
    p.add_argument("--target", type=float, default=1.60, help="char-GPT validation loss to reach")
    p.add_argument("--target-steps", type=int, default=3000, help="give up after this many steps (0: skip)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=512)
    p.add_argument("--skip-checks", action="store_true", help="time without the correctness checks")
    p.add_argument("--whole-run-only", action="store_true",
                   help="skip the per-method step table: default-schedule runs and time to target only")  # fmt: skip
    p.add_argument("--roots", action="store_true", help="also time eigh against Newton inverse roots first")
    p.add_argument("--deepspeed-check", action="store_true",
                   help="after the timing, ZeRO-0/2/3 + attach() against one process (needs deepspeed)")  # fmt: skip
    args = peers.finish_common_args(p, p.parse_args(argv))
    if "adamw" not in args.target_methods:
        args.target_methods.insert(0, "adamw")  # the time-to-target ratios are against AdamW
    device = torch.device(args.device)
    if not args.skip_checks and not device_checks(device):
        raise SystemExit(f"checks failed: {gpu_check.FAILED}; no timing on a wrong step")
    roots = inverse_roots.main(["--device", device.type]) if args.roots else None
    res = targets(args, device, peers.load_peers(args))
    if roots is not None:
        res["inverse_roots"] = roots
    print("\n" + targets_table(res, args.target))
    peers.write_json(args.json, res)
    if args.deepspeed_check:
        print("\n| check | result | detail |\n|---|---|---|")
        gpu_check.deepspeed_world1(device)  # after the timing: a machine without deepspeed still times
    return res


if __name__ == "__main__":
    main()
