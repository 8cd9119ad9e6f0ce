"""Findings 3/4 (Figs. 3-4): the second-order advantage follows the batch-to-dataset ratio.

At a fixed batch and a fixed number of steps, training sets of increasing size are seen for fewer
epochs: the small ones many times over (data-limited, train and eval loss apart), the large ones only
a few times. Two families: CIFAR-10 subsets (ViT) and Tiny Shakespeare slices (char-GPT, sizes in
characters). Each method's lr is the best of a small sweep per size; the report gives the epochs
seen, the train/eval gap (so the regime is visible) and the advantage of each second-order method
over AdamW against batch / dataset size.
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
    method_lrs,
    method_overrides,
    save,
    select,
    shakespeare_base,
)

NAME = "dataset_size"
QUESTION = "Does the second-order advantage over AdamW follow the batch-to-dataset ratio (data-limited regime)?"

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "cifar": {"model": (16, 1), "sizes": [128, 512], "batch": 64, "steps": 16, "eval_size": 128},
        "shakespeare": {"model": (16, 1), "block": 32, "sizes": [2_000, 50_000], "batch": 16, "steps": 10},
        "methods": ["adamw", "kfac"], "lr_pick": [1],
    },
    "small": {
        "cifar": {"model": (32, 2), "sizes": [500, 2_000, 8_000], "batch": 250, "steps": 320, "eval_size": 1000},
        "shakespeare": {"model": (32, 2), "block": 64, "sizes": [10_000, 100_000, 1_000_000], "batch": 32,
                        "steps": 300},
        "methods": ["adamw", "kfac"], "lr_pick": [0, 1],
    },
    "full": {
        "cifar": {"model": (192, 6), "sizes": [1_000, 5_000, 25_000, 50_000], "batch": 1024, "steps": 5000,
                  "eval_size": None},
        "shakespeare": {"model": (256, 6), "block": 256, "sizes": [30_000, 300_000, 1_003_854], "batch": 256,
                        "steps": 5000},
        "methods": ["adamw", "kfac", "shampoo"], "lr_pick": [0, 1, 2],
    },
}  # fmt: skip
FAMILIES = ("cifar", "shakespeare")


def base(preset: str) -> dict[str, Any]:
    c = PRESETS[preset]["cifar"]
    cfg = cifar_base(*c["model"], c["sizes"][0], c["eval_size"], c["batch"])
    cfg["train"].update({"epochs": None, "steps": c["steps"]})
    return cfg


def _family_overrides(preset: str, family: str, size: int) -> dict[str, Any]:
    f = PRESETS[preset][family]
    if family == "cifar":
        return {"data.train_size": size, "train.batch_size": f["batch"], "train.steps": f["steps"],
                "train.eval_interval": max(1, f["steps"] // 4)}  # fmt: skip
    s = shakespeare_base(*f["model"], f["block"], size, f["batch"])
    over = {f"{sec}.{k}": v for sec in ("model", "data") for k, v in s[sec].items()}
    over.update({"data.eval_size": None, "train.batch_size": f["batch"], "train.steps": f["steps"],
                 "train.eval_interval": max(1, f["steps"] // 4)})  # fmt: skip
    return over


def cells(preset: str, records: list[Record]) -> list[Cell]:
    p = PRESETS[preset]
    out = []
    for family in FAMILIES:
        for size in p[family]["sizes"]:
            for method in p["methods"]:
                for lr in method_lrs(method, p["lr_pick"]):
                    over = {**_family_overrides(preset, family, size), **method_overrides(method, lr)}
                    tags = {"family": family, "size": size, "method": method, "lr": lr, "batch": p[family]["batch"]}
                    out.append(Cell(f"{family}-n{size}-{method}-lr{lr_tag(lr)}", over, tags))
    return out


def _epochs(p: dict[str, Any], family: str, r: Record) -> float | None:
    steps = r.summary.get("steps")
    if steps is None:
        return None
    f = p[family]
    per_step = f["batch"] * (f["block"] if family == "shakespeare" else 1)
    n = r.summary.get("num_train") or r.tags["size"]
    return steps * per_step / n


def report(preset: str, records: list[Record], out: Path) -> tuple[str, dict[str, Any]]:
    p = PRESETS[preset]
    analysis: dict[str, Any] = {}
    rows = []
    for family in FAMILIES:
        fam = analysis[family] = {}
        for size in p[family]["sizes"]:
            per = {}
            for method in p["methods"]:
                best = best_by(select(records, family=family, size=size, method=method))
                if best is None:
                    per[method] = None
                    rows.append(f"| {family} | {size} | — | {method} | — | — | — | — | — | failed |")
                    continue
                s = best.summary
                gap = (s["eval_loss"] - s["train_loss"]) if s.get("train_loss") is not None else None
                per[method] = {"lr": best.tags["lr"], "eval_loss": s["eval_loss"], "train_loss": s["train_loss"],
                               "gap": gap, "epochs": _epochs(p, family, best),
                               "eval_accuracy": s.get("eval_accuracy")}  # fmt: skip
                ratio = p[family]["batch"] * (p[family]["block"] if family == "shakespeare" else 1) / size
                rows.append(
                    f"| {family} | {size} | {ratio:.3g} | {method} | {fmt(best.tags['lr'], 'g')} "
                    f"| {fmt(per[method]['epochs'], '.1f')} | {fmt(s['train_loss'], '.4f')} "
                    f"| {fmt(s['eval_loss'], '.4f')} "
                    f"| {fmt(gap, '+.4f')} | {fmt(s.get('eval_accuracy'), '.1f', scale=100)} |"
                )
            adam = (per.get("adamw") or {}).get("eval_loss", math.inf)
            adv = {m: adam - v["eval_loss"] for m, v in per.items() if m in SECOND_ORDER and v
                   and math.isfinite(v["eval_loss"]) and math.isfinite(adam)}  # fmt: skip
            fam[size] = {"methods": per, "advantage_over_adamw": adv}
    table = [
        "Fixed batch and number of steps per family, so smaller sets are seen for more epochs. Batch/data = "
        "examples per step / training examples (characters for Shakespeare: batch x block / characters). "
        "Best lr per method and size; train loss = mean of the last 10% of steps; gap = eval - train.",
        "",
        "| data | size | batch/data | method | lr | epochs | train loss | eval loss | gap | eval acc % |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Eval-loss advantage over AdamW (positive = second-order better):",
        "",
    ]
    for family in FAMILIES:
        for size, a in analysis[family].items():
            adv = ", ".join(f"{m} {v:+.3f}" for m, v in a["advantage_over_adamw"].items()) or "—"
            table.append(f"- {family} n={size}: {adv}")
    figs = _plots(p, analysis, out)
    analysis["figures"] = figs
    table += ["", *[f"![{f}]({f})" for f in figs]]
    return "\n".join(table) + "\n", analysis


def _plots(p: dict[str, Any], analysis: dict[str, Any], out: Path) -> list[str]:
    fig, axes = figure(out / "fig_advantage_vs_ratio.png", "Second-order advantage over AdamW vs batch/dataset size",
                       "batch / training-set size (per step)", "AdamW eval loss - method eval loss (nats)",
                       ncols=2, xlog=True)  # fmt: skip
    for ax, family in zip(axes, FAMILIES, strict=True):
        ax.set_title(family, fontsize=9)
        f = p[family]
        per_step = f["batch"] * (f["block"] if family == "shakespeare" else 1)
        for method in [m for m in p["methods"] if m in SECOND_ORDER]:
            pts = [(per_step / n, a["advantage_over_adamw"].get(method)) for n, a in analysis[family].items()]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.legend(fontsize=7)
    names = [save(fig, out / "fig_advantage_vs_ratio.png")]
    fig, axes = figure(out / "fig_train_vs_eval.png", "Regime: train and eval loss by training-set size (best lr)",
                       "training-set size (images / characters)", "loss (nats)", ncols=2, xlog=True)  # fmt: skip
    for ax, family in zip(axes, FAMILIES, strict=True):
        ax.set_title(family, fontsize=9)
        for method in p["methods"]:
            pts = [(n, a["methods"].get(method)) for n, a in analysis[family].items()]
            pts = [(n, v) for n, v in pts if v and math.isfinite(v["eval_loss"]) and v["train_loss"] is not None]
            if pts:
                xs = [n for n, _ in pts]
                line = ax.plot(xs, [v["eval_loss"] for _, v in pts], marker="o", label=f"{method} eval")
                ax.plot([n for n, _ in pts], [v["train_loss"] for _, v in pts], marker="x", ls="--",
                        color=line[0].get_color(), label=f"{method} train")  # fmt: skip
        ax.legend(fontsize=7)
    names.append(save(fig, out / "fig_train_vs_eval.png"))
    return names
