"""Finding 1 (Fig. 1): second-order methods pull ahead of AdamW and SGD as the batch grows.

Every method gets its best learning rate from a sweep at each batch size (seed 0, lowest final eval
loss); the best one is then repeated with more seeds. All runs train for the same number of epochs,
so large batches take fewer steps. Reported: final eval loss at that epoch budget, and the steps and
training seconds each method needs to reach a target eval loss: per batch size, AdamW's final eval loss
at its best lr (the first-order baseline; the worst method's loss when AdamW is not in the grid, which
a diverged method would make meaningless). A method that never reaches it shows a dash.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ds_soo.experiments.base import (
    SECOND_ORDER,
    Cell,
    Record,
    best_by,
    cifar_base,
    figure,
    fmt,
    lr_tag,
    mean_std,
    method_lrs,
    method_overrides,
    save,
    select,
    value_ticks,
)
from ds_soo.experiments.metrics import steps_to_target

NAME = "batch_sweep"
QUESTION = "Does the second-order advantage over AdamW/SGD grow with the batch size (at a fixed epoch budget)?"

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"model": (16, 1), "train_size": 256, "eval_size": 128, "batches": [32, 128], "epochs": 2,
              "methods": ["adamw", "kfac"], "lr_pick": [0, 2], "seeds": 2},
    "small": {"model": (32, 2), "train_size": 2000, "eval_size": 1000, "batches": [32, 128, 512], "epochs": 10,
              "methods": ["adamw", "sgd", "kfac", "shampoo", "psgd"], "lr_pick": "all", "seeds": 2},
    "full": {"model": (192, 6), "train_size": None, "eval_size": None, "batches": [128, 512, 2048, 8192],
             "epochs": 30, "methods": ["adamw", "sgd", "kfac", "shampoo", "psgd"], "lr_pick": "all",
             "seeds": 3},
}  # fmt: skip


def base(preset: str) -> dict[str, Any]:
    p = PRESETS[preset]
    cfg = cifar_base(*p["model"], p["train_size"], p["eval_size"], p["batches"][0])
    cfg["train"]["epochs"] = p["epochs"]
    return cfg


def _eval_interval(p: dict[str, Any], batch: int) -> int:
    n = p["train_size"] or 50_000
    steps = max(1, n // batch) * p["epochs"]
    return max(1, steps // 6)


def cells(preset: str, records: list[Record]) -> list[Cell]:
    p = PRESETS[preset]
    out = []
    for batch in p["batches"]:
        for method in p["methods"]:
            lrs = method_lrs(method, p["lr_pick"])
            for lr in lrs:
                over = {**method_overrides(method, lr), "train.batch_size": batch,
                        "train.eval_interval": _eval_interval(p, batch)}  # fmt: skip
                tags = {"method": method, "lr": lr, "batch": batch, "seed": 0}
                out.append(Cell(f"{method}-b{batch}-lr{lr_tag(lr)}-s0", over, tags))
    stage1 = {c.name for c in out}
    if not stage1 <= {r.name for r in records}:
        return out
    # Stage 2: the best lr of each (method, batch) again with more seeds.
    for batch in p["batches"]:
        for method in p["methods"]:
            best = best_by(select(records, method=method, batch=batch, seed=0))
            if best is None:
                continue
            lr = best.tags["lr"]
            for seed in range(1, p["seeds"]):
                over = {**method_overrides(method, lr), "train.batch_size": batch, "train.seed": seed,
                        "data.seed": seed, "train.eval_interval": _eval_interval(p, batch)}  # fmt: skip
                tags = {"method": method, "lr": lr, "batch": batch, "seed": seed}
                out.append(Cell(f"{method}-b{batch}-lr{lr_tag(lr)}-s{seed}", over, tags))
    return out


def report(preset: str, records: list[Record], out: Path) -> tuple[str, dict[str, Any]]:
    p = PRESETS[preset]
    rows, analysis = [], {"per_batch": {}}
    for batch in p["batches"]:
        best_runs = {}
        for method in p["methods"]:
            best = best_by(select(records, method=method, batch=batch, seed=0))
            if best is not None:
                best_runs[method] = [r for r in select(records, method=method, batch=batch, lr=best.tags["lr"])]
        # Seed 0 everywhere: the target and the runs measured against it are the same sweep.
        finals = [r.summary["eval_loss"] for rs in best_runs.values() for r in rs if r.tags["seed"] == 0]
        adamw = [r.summary["eval_loss"] for r in best_runs.get("adamw", []) if r.tags["seed"] == 0]
        target = adamw[0] if adamw else max((f for f in finals if math.isfinite(f)), default=math.inf)
        per = {}
        for method in p["methods"]:
            rs = best_runs.get(method, [])
            loss, loss_sd = mean_std([r.summary["eval_loss"] for r in rs])
            accs = [r.summary["eval_accuracy"] for r in rs if r.summary.get("eval_accuracy") is not None]
            acc, acc_sd = mean_std(accs) if accs else (None, None)
            s0 = next((r for r in rs if r.tags["seed"] == 0), None)
            step, secs = steps_to_target(s0.summary, target, s0.metrics, s0.out) if s0 else (None, None)
            per[method] = {"lr": rs[0].tags["lr"] if rs else None, "eval_loss": loss, "eval_loss_std": loss_sd,
                           "eval_accuracy": acc, "seeds": len(rs), "steps_to_target": step,
                           "seconds_to_target": secs,
                           "step_time_mean_s": s0.summary.get("step_time_mean_s") if s0 else None,
                           "steps": s0.summary.get("steps") if s0 else None}  # fmt: skip
            rows.append(
                f"| {batch} | {method} | {fmt(per[method]['lr'], 'g')} | {len(rs)} "
                f"| {fmt(loss, '.4f', loss_sd)} | {fmt(acc, '.1f', acc_sd, 100)} "
                f"| {fmt(per[method]['steps'], 'd')} | {fmt(step, 'd')} | {fmt(secs, '.1f')} "
                f"| {fmt(per[method]['step_time_mean_s'], '.1f', scale=1e3)} |"
            )
        adam = per.get("adamw", {}).get("eval_loss", math.inf)
        soo = {m: per[m]["eval_loss"] for m in per if m in SECOND_ORDER}
        advantage = {m: adam - v for m, v in soo.items() if math.isfinite(v) and math.isfinite(adam)}
        analysis["per_batch"][batch] = {"target_eval_loss": target, "methods": per, "advantage_over_adamw": advantage}
    table = [
        f"Fixed budget of {p['epochs']} epochs on {p['train_size'] or 50000} training images; best lr per "
        "method and batch from the seed-0 sweep, then mean ± std over seeds at that lr. Target = AdamW's "
        "final eval loss at its best lr (seed 0) at that batch; 'steps/s to target' are the first evaluation at or "
        "below it (evaluated every ~1/6 of the run) and the training seconds up to it.",
        "",
        "| batch | method | best lr | seeds | eval loss | eval acc % | steps | steps to target | s to target "
        "| mean step ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Eval-loss advantage of each second-order method over AdamW (positive = better than AdamW):",
        "",
    ]
    for batch, a in analysis["per_batch"].items():
        adv = ", ".join(f"{m} {v:+.3f}" for m, v in a["advantage_over_adamw"].items()) or "—"
        table.append(f"- batch {batch}: {adv}")
    figs = _plots(p, analysis, out)
    analysis["figures"] = figs
    table += ["", *[f"![{f}]({f})" for f in figs]]
    return "\n".join(table) + "\n", analysis


def _plots(p: dict[str, Any], analysis: dict[str, Any], out: Path) -> list[str]:
    batches = p["batches"]
    fig, (ax,) = figure(out / "fig_final_loss_vs_batch.png", "Final eval loss at a fixed epoch budget (best lr)",
                        "batch size (images per step)", "eval loss (cross-entropy, nats)", xlog=True)  # fmt: skip
    for method in p["methods"]:
        ys = [analysis["per_batch"][b]["methods"][method]["eval_loss"] for b in batches]
        sds = [analysis["per_batch"][b]["methods"][method]["eval_loss_std"] or 0.0 for b in batches]
        ok = [(b, y, s) for b, y, s in zip(batches, ys, sds, strict=True) if math.isfinite(y)]
        if ok:
            ax.errorbar([o[0] for o in ok], [o[1] for o in ok], yerr=[o[2] for o in ok], marker="o", label=method,
                        capsize=3)  # fmt: skip
    value_ticks(ax, batches)
    ax.legend(fontsize=8)
    names = [save(fig, out / "fig_final_loss_vs_batch.png")]
    fig, (ax,) = figure(out / "fig_time_to_target.png", "Training time to the target eval loss (seed 0, best lr)",
                        "batch size (images per step)", "seconds to target (s)", xlog=True, ylog=True)  # fmt: skip
    for method in p["methods"]:
        pts = [(b, analysis["per_batch"][b]["methods"][method]["seconds_to_target"]) for b in batches]
        pts = [(b, s) for b, s in pts if s]
        if pts:
            ax.plot([b for b, _ in pts], [s for _, s in pts], marker="o", label=method)
    value_ticks(ax, batches)
    ax.legend(fontsize=8)
    names.append(save(fig, out / "fig_time_to_target.png"))
    return names
