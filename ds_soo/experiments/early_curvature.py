"""Finding 4 (Table 1): curvature needs frequent refreshes only early in training.

A grid of the frequent-phase fraction x the later refresh interval (0 = frozen), with statistics every
10 steps throughout as in the study (only the interval between inverse refreshes changes), plus a
run that refreshes frequently all along, ``sparse_interval=auto`` after each frequent phase, and
AdamW as the reference. Reported per cell: final accuracy, refreshes, and the amortised (mean) step
time against AdamW's. The warm-phase floor is switched off (``warm_min_refreshes=0``) so that each
fraction is honoured; the run length is chosen so the shortest frequent phase still spans several
refreshes.

One run per cell cannot rank cells a few points apart (seeds move a cell by several points), so a
second stage repeats the best fixed cell and the best ``auto`` cell (each chosen by the grid's
accuracy, so both carry the same selection) over ``repeat_seeds`` and compares them seed by seed
(paired): auto is "at least equal" when its mean accuracy over the seeds is, with fewer refreshes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ds_soo.experiments.base import Cell, Record, cifar_base, figure, fmt, mean_std, method_overrides, save, select

NAME = "early_curvature"
QUESTION = "Is frequent curvature needed only early: which frequent-phase length x later interval keeps accuracy?"

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"model": (16, 1), "train_size": 512, "eval_size": 128, "batch": 16, "steps": 30, "k": 2,
              "fractions": [0.1, 0.5], "intervals": [0, 10], "method": "kfac", "lr": 0.1, "repeat_seeds": [1]},
    "small": {"model": (32, 2), "train_size": 10_000, "eval_size": 1000, "batch": 128, "steps": 800, "k": 10,
              "fractions": [0.05, 0.15, 0.4], "intervals": [0, 50, 200], "method": "kfac", "lr": 0.1,
              "repeat_seeds": list(range(1, 8))},
    "full": {"model": (192, 6), "train_size": None, "eval_size": None, "batch": 512, "steps": 10_000, "k": 10,
             "fractions": [0.01, 0.03, 0.1, 0.3], "intervals": [0, 100, 500, 2000], "method": "kfac", "lr": 0.1,
             "repeat_seeds": [1, 2, 3]},
}  # fmt: skip
ADAMW_LR = 3e-3


def base(preset: str) -> dict[str, Any]:
    p = PRESETS[preset]
    cfg = cifar_base(*p["model"], p["train_size"], p["eval_size"], p["batch"])
    cfg["train"].update({"epochs": None, "steps": p["steps"]})
    k = p["k"]
    cfg["precond"]["schedule"] = {"warm_interval": k, "stats_warm_interval": k, "stats_sparse_interval": k,
                                  "warm_min_refreshes": 0, "auto_min_interval": k, "stagger": False}  # fmt: skip
    return cfg


def _grid(preset: str) -> list[Cell]:
    p = PRESETS[preset]
    m = method_overrides(p["method"], p["lr"])
    out = [Cell("adamw", method_overrides("adamw", ADAMW_LR), {"kind": "adamw"})]
    out.append(Cell("always", {**m, "precond.schedule.warm_fraction": 1.0}, {"kind": "always", "fraction": 1.0}))
    for f in p["fractions"]:
        for k2 in [*p["intervals"], "auto"]:
            over = {**m, "precond.schedule.warm_fraction": f, "precond.schedule.sparse_interval": k2}
            kind = "auto" if k2 == "auto" else "fixed"
            out.append(Cell(f"f{f:g}-k{k2}", over, {"kind": kind, "fraction": f, "interval": k2}))
    return out


def cells(preset: str, records: list[Record], repeat_seeds: list[int] | None = None) -> list[Cell]:
    """The grid; once it has run, the best fixed and the best auto cell again at each repeat seed
    (``repeat_seeds``, default the preset's)."""
    grid = _grid(preset)
    done = {r.name.split("@")[0] for r in records}
    best, best_auto = _best_of(records, "fixed"), _best_of(records, "auto")
    user_seeds = any(o.startswith("train.seed=") for r in records for o in r.overrides)
    if not {c.name for c in grid} <= done or best is None or best_auto is None or user_seeds:
        return grid  # a user sweep over train.seed already gives the seeds to pair
    by_name = {c.name: c for c in grid}
    pair = (best.name.partition("@")[0], best_auto.name.partition("@")[0])
    base_seed = _seed(best)
    for seed in PRESETS[preset]["repeat_seeds"] if repeat_seeds is None else repeat_seeds:
        if seed == base_seed:
            continue  # the grid's own runs are that seed's pair
        for name in pair:
            cell = by_name[name]
            tags = {**cell.tags, "kind": "repeat", "of": name, "seed": seed}
            grid.append(Cell(f"{name}-seed{seed}", {**cell.overrides, "train.seed": seed}, tags))
    return grid


def _best_of(records: list[Record], kind: str) -> Record | None:
    """The most accurate run of ``kind`` ("fixed" or "auto"); None when every one failed."""
    runs = [r for r in records if r.tags.get("kind") == kind]
    best = max(runs, key=_score, default=None)
    return best if best is not None and math.isfinite(_score(best)) else None


def _seed(r: Record) -> int | None:
    """The run's effective ``train.seed``: the last override of it, else the base config's."""
    seed = ((r.metrics or {}).get("config") or {}).get("train", {}).get("seed")
    for o in r.overrides:
        if o.startswith("train.seed="):
            seed = o.split("=", 1)[1]
    try:
        return int(seed) if seed is not None else None
    except ValueError:
        return None


def _paired(records: list[Record], best: Record, best_auto: Record) -> dict[str, Any] | None:
    """The best fixed cell against the best auto cell, seed by seed (the grid's own runs count too)."""
    fixed, auto = best.name.partition("@")[0], best_auto.name.partition("@")[0]
    runs: dict[str, dict[int, Record]] = {fixed: {}, auto: {}}
    for r in records:
        name, _, user = r.name.partition("@")
        if user and not all(part.startswith("seed=") for part in user.split(",")):
            continue  # a user grid over anything but the seed: its cells are not comparable across combos
        name = r.tags.get("of", name) if r.tags.get("kind") == "repeat" else name
        seed = _seed(r)
        if name in runs and seed is not None:
            runs[name].setdefault(seed, r)  # a failed run stays in: it scores -inf, never hidden
    seeds = sorted(set(runs[fixed]) & set(runs[auto]))
    if len(seeds) < 2:
        return None
    rows = []
    for seed in seeds:
        f, a = runs[fixed][seed], runs[auto][seed]
        rows.append({"seed": seed, "fixed_accuracy": _score(f), "auto_accuracy": _score(a),
                     "fixed_loss": f.summary["eval_loss"], "auto_loss": a.summary["eval_loss"],
                     "fixed_refreshes": _mean_block_refreshes(f),
                     "auto_refreshes": _mean_block_refreshes(a)})  # fmt: skip
    diffs = [r["auto_accuracy"] - r["fixed_accuracy"] for r in rows]
    mean_diff, sd = mean_std(diffs)
    se = sd / math.sqrt(len(diffs)) if sd is not None else None

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    fixed_acc, auto_acc = mean("fixed_accuracy"), mean("auto_accuracy")
    fixed_ref, auto_ref = mean("fixed_refreshes"), mean("auto_refreshes")
    ok = (math.isfinite(mean_diff) and auto_acc >= fixed_acc and fixed_ref is not None and auto_ref is not None
          and auto_ref < fixed_ref)  # fmt: skip
    return {"fixed": fixed, "auto": auto, "seeds": seeds, "rows": rows,
            "fixed_accuracy": fixed_acc, "auto_accuracy": auto_acc,
            "fixed_loss": mean("fixed_loss"), "auto_loss": mean("auto_loss"),
            "fixed_refreshes": fixed_ref, "auto_refreshes": auto_ref,
            "accuracy_diff_mean": mean_diff, "accuracy_diff_sd": sd,
            "accuracy_diff_t": mean_diff / se if se else None,
            "auto_at_least_equal_seeds": sum(d >= 0 for d in diffs),
            "auto_loss_higher_seeds": sum(r["auto_loss"] > r["fixed_loss"] for r in rows),
            "equal_or_better_with_fewer": ok}  # fmt: skip


def _mean_block_refreshes(r: Record) -> float | None:
    blocks = r.summary.get("block_refreshes") or {}
    return sum(blocks.values()) / len(blocks) if blocks else None


def _score(r: Record) -> float:
    acc = r.summary.get("eval_accuracy")
    return acc if acc is not None and math.isfinite(r.summary["eval_loss"]) else -math.inf


def report(preset: str, records: list[Record], out: Path) -> tuple[str, dict[str, Any]]:
    p = PRESETS[preset]
    adam = next(iter(select(records, kind="adamw")), None)
    adam_t = adam.summary.get("step_time_mean_s") if adam else None
    rows, cellsum = [], {}
    repeats = [r for r in records if r.tags.get("kind") == "repeat"]
    records = [r for r in records if r.tags.get("kind") != "repeat"]
    for r in records:
        s = r.summary
        t = s.get("step_time_mean_s")
        ratio = t / adam_t if t and adam_t else None
        blocks = s.get("block_refreshes") or {}
        frozen = (r.metrics or {}).get("schedule_auto") or {}
        n_frozen = sum(1 for b in frozen.values() if b.get("frozen"))
        cellsum[r.name] = {"tags": r.tags, "eval_accuracy": s.get("eval_accuracy"), "eval_loss": s["eval_loss"],
                           "refreshes": s.get("curvature_refreshes"), "block_refreshes": blocks,
                           "frozen_blocks": n_frozen if frozen else None, "step_time_mean_s": t,
                           "step_time_vs_adamw": ratio}  # fmt: skip
        per_block = f"{min(blocks.values())}-{max(blocks.values())}" if blocks else "—"
        cellsum[r.name]["block_refreshes_mean"] = mean_refreshes = _mean_block_refreshes(r)
        rows.append(
            f"| {r.name} | {fmt(r.tags.get('fraction'), 'g')} | {r.tags.get('interval', '—')} "
            f"| {fmt(s.get('eval_accuracy'), '.1f', scale=100)} | {fmt(s['eval_loss'], '.4f')} "
            f"| {fmt(s.get('curvature_refreshes'), 'd')} | {fmt(mean_refreshes, '.1f')} | {per_block} "
            f"| {f'{n_frozen}/{len(frozen)}' if frozen else '—'} | {fmt(t, '.1f', scale=1e3)} | {fmt(ratio, '.2f')} |"
        )
    best_fixed, best_auto = _best_of(records, "fixed"), _best_of(records, "auto")
    verdict = []
    for r in select(records, kind="auto"):
        if best_fixed is None:
            break
        a, b = _score(r), _score(best_fixed)
        # The cost a refresh schedule saves is inverses computed: refreshes summed per block (under
        # ``auto`` blocks refresh at different steps, so steps with any refresh would overstate it).
        ra, rb = _mean_block_refreshes(r), _mean_block_refreshes(best_fixed)
        ok = a >= b and ra is not None and rb is not None and ra < rb
        verdict.append({"auto": r.name, "best_fixed": best_fixed.name, "accuracy": a, "best_fixed_accuracy": b,
                        "refreshes": ra, "best_fixed_refreshes": rb, "equal_or_better_with_fewer": ok})  # fmt: skip
    paired = _paired(records + repeats, best_fixed, best_auto) if best_fixed and best_auto else None
    analysis = {"cells": cellsum, "best_fixed": best_fixed.name if best_fixed else None, "auto_vs_best_fixed": verdict,
                "auto_vs_best_fixed_paired": paired}  # fmt: skip
    table = [
        f"{p['method']} at lr {p['lr']:g}, batch {p['batch']}, {p['steps']} steps; statistics every {p['k']} steps "
        f"throughout; frequent phase refreshes every {p['k']} steps for the first fraction of the run, then every "
        "`interval` steps (0 = frozen, auto = adaptive per block). 'always' refreshes every "
        f"{p['k']} steps all run; step time vs AdamW = mean step time (refreshes included) / AdamW's.",
        "",
        "| cell | fraction | interval | eval acc % | eval loss | refresh steps | refreshes per block, mean | range "
        "| frozen blocks | mean step ms "
        "| vs AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Best fixed cell by accuracy: **{analysis['best_fixed']}**.",
    ]
    for v in verdict:
        table.append(
            f"- {v['auto']}: {fmt(v['accuracy'], '.1f', scale=100)}% with {fmt(v['refreshes'], '.1f')} refreshes "
            f"per block vs {fmt(v['best_fixed_accuracy'], '.1f', scale=100)}% with "
            f"{fmt(v['best_fixed_refreshes'], '.1f')}: "
            f"{'at least equal accuracy with fewer refreshes' if v['equal_or_better_with_fewer'] else 'not better'}."
        )
    table += _paired_table(paired)
    figs = _plots(p, records, out)
    analysis["figures"] = figs
    table += ["", *[f"![{f}]({f})" for f in figs]]
    return "\n".join(table) + "\n", analysis


def _pct(v: float | None, spec: str = ".1f") -> str:
    return fmt(v, spec, scale=100)


def _paired_table(v: dict[str, Any] | None) -> list[str]:
    if v is None:
        return []
    head = "| seed | fixed acc % | auto acc % | auto − fixed | fixed loss | auto loss | fixed refr. | auto refr. |"
    out = ["", f"**Repeated over seeds {', '.join(map(str, v['seeds']))}** (paired: same seed, same data; "
           f"{v['fixed']} against {v['auto']}; refr. = refreshes per block):", "", head,
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def row(label: Any, fa: float, aa: float, diff: float, fl: float, al: float, fr: Any, ar: Any) -> str:
        cols = [str(label), _pct(fa), _pct(aa), _pct(diff, "+.1f"), fmt(fl, ".4f"), fmt(al, ".4f"),
                fmt(fr, ".1f"), fmt(ar, ".1f")]  # fmt: skip
        return "| " + " | ".join(cols) + " |"

    for r in v["rows"]:
        out.append(row(r["seed"], r["fixed_accuracy"], r["auto_accuracy"], r["auto_accuracy"] - r["fixed_accuracy"],
                       r["fixed_loss"], r["auto_loss"], r["fixed_refreshes"], r["auto_refreshes"]))  # fmt: skip
    out.append(row("mean", v["fixed_accuracy"], v["auto_accuracy"], v["accuracy_diff_mean"], v["fixed_loss"],
                   v["auto_loss"], v["fixed_refreshes"], v["auto_refreshes"]))  # fmt: skip
    n = len(v["rows"])
    verdict = ("**at least equal mean accuracy with fewer refreshes**" if v["equal_or_better_with_fewer"]
               else "**not shown** (lower mean accuracy, or no fewer refreshes)")  # fmt: skip
    out += ["", f"Paired accuracy difference {_pct(v['accuracy_diff_mean'], '+.1f')} points "
            f"(sd {_pct(v['accuracy_diff_sd'])}, t {fmt(v['accuracy_diff_t'], '.2f')} over {n} seeds); auto at least "
            f"equal at {v['auto_at_least_equal_seeds']} of {n} seeds, eval loss higher at "
            f"{v['auto_loss_higher_seeds']} of {n}. Verdict: {verdict}."]  # fmt: skip
    return out


def _plots(p: dict[str, Any], records: list[Record], out: Path) -> list[str]:
    cols = [*p["intervals"], "auto"]
    title = "Final eval accuracy by frequent-phase fraction and later interval"
    fig, (ax,) = figure(out / "fig_accuracy_grid.png", title,
                        "later refresh interval (steps; 0 = frozen)", "frequent-phase fraction of the run")  # fmt: skip
    grid = [[math.nan] * len(cols) for _ in p["fractions"]]
    for r in records:
        if r.tags.get("kind") in ("fixed", "auto"):
            i, j = p["fractions"].index(r.tags["fraction"]), cols.index(r.tags["interval"])
            acc = r.summary.get("eval_accuracy")
            grid[i][j] = 100 * acc if acc is not None else math.nan
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(p["fractions"])), [f"{f:g}" for f in p["fractions"]])
    ax.grid(False)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax, label="eval accuracy (%)")
    names = [save(fig, out / "fig_accuracy_grid.png")]
    fig, (ax,) = figure(out / "fig_step_time_vs_adamw.png", "Amortised step time against AdamW (mean, refreshes in)",
                        "run", "mean step time / AdamW's (ratio)")  # fmt: skip
    adam = next(iter(select(records, kind="adamw")), None)
    base_t = adam.summary.get("step_time_mean_s") if adam else None
    pts = [(r.name, r.summary.get("step_time_mean_s")) for r in records if r.tags.get("kind") != "adamw"]
    pts = [(n, t / base_t) for n, t in pts if t and base_t]
    ax.bar(range(len(pts)), [v for _, v in pts])
    ax.set_xticks(range(len(pts)), [n for n, _ in pts], rotation=60, fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    names.append(save(fig, out / "fig_step_time_vs_adamw.png"))
    return names
