"""Finding 2 (Fig. 2): the quality index c(P) of PSGD's preconditioner follows the number of iterations,
not the batch size; K-FAC's and Shampoo's (built from statistics) are compared at the same points.

Each method trains for the same number of optimizer steps at several batch sizes, and c(P)
(:func:`ds_soo.diagnostics.quality_index`, random probes with Hessian-vector products) is logged every
``quality_interval`` steps (steps / interval must exceed the largest / smallest batch, so that the
runs overlap in examples seen). If quality follows iterations, the curves for different batch sizes lie on
top of each other when plotted against steps and apart when plotted against examples seen. The
summary number is the spread of log c(P) across batch sizes, at equal steps and at equal examples.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ds_soo.experiments.base import Cell, Record, cifar_base, figure, fmt, method_overrides, save, select

NAME = "curvature_quality"
QUESTION = "Does a method's preconditioner quality c(P) follow the number of iterations or the batch size?"

# One learning rate per method (quality, not the best loss, is measured), the middle of its grid.
LRS = {"psgd": 1e-3, "kfac": 0.1, "shampoo": 1e-3}  # psgd: 0.1 and 0.01 diverged on CIFAR-10 (batch_sweep)

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"model": (16, 1), "train_size": 512, "batches": [16, 32], "steps": 12, "every": 2, "probes": 2,
              "methods": ["psgd", "kfac"]},
    "small": {"model": (32, 2), "train_size": 4000, "batches": [32, 128, 512], "steps": 320, "every": 16,
              "probes": 2, "methods": ["psgd", "kfac", "shampoo"]},
    "full": {"model": (192, 6), "train_size": None, "batches": [64, 256, 1024, 4096], "steps": 5000,
             "every": 50, "probes": 8, "methods": ["psgd", "kfac", "shampoo"]},
}  # fmt: skip


def base(preset: str) -> dict[str, Any]:
    p = PRESETS[preset]
    cfg = cifar_base(*p["model"], p["train_size"], 256 if preset == "smoke" else 1000, p["batches"][0])
    cfg["train"].update({"epochs": None, "steps": p["steps"]})
    cfg["precond"]["diagnostics"] = {"quality_interval": p["every"], "quality_probes": p["probes"]}
    return cfg


def cells(preset: str, records: list[Record]) -> list[Cell]:
    p = PRESETS[preset]
    out = []
    for method in p["methods"]:
        for batch in p["batches"]:
            over = {**method_overrides(method, LRS[method]), "train.batch_size": batch}
            out.append(Cell(f"{method}-b{batch}", over, {"method": method, "batch": batch, "lr": LRS[method]}))
    return out


def _curve(r: Record) -> list[tuple[int, float]]:
    points = [(int(q["step"]), q.get("quality_index")) for q in r.summary.get("quality_index", [])]
    return [(s, float(v)) for s, v in points if v is not None and math.isfinite(v) and v > 0]


def _log_spread(values: list[float]) -> float | None:
    """max/min ratio across batch sizes as a spread of log c(P) (0 = identical)."""
    vals = [v for v in values if v is not None and v > 0]
    return math.log(max(vals) / min(vals)) if len(vals) >= 2 else None


def _interp(curve: list[tuple[float, float]], x: float) -> float | None:
    """log-linear interpolation of c(P) at ``x`` (None outside the logged range)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x0 <= x <= x1:
            w = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
    return None


def report(preset: str, records: list[Record], out: Path) -> tuple[str, dict[str, Any]]:
    p = PRESETS[preset]
    analysis: dict[str, Any] = {"methods": {}}
    rows = []
    for method in p["methods"]:
        curves = {r.tags["batch"]: _curve(r) for r in select(records, method=method)}
        curves = {b: c for b, c in curves.items() if c}
        if len(curves) < 2:
            analysis["methods"][method] = {"note": "fewer than two batch sizes produced c(P)"}
            rows.append(f"| {method} | — | — | — | fewer than two runs produced c(P) |")
            continue
        # Equal steps: the last step every run logged. Equal examples: the largest count all runs cover.
        last_step = min(c[-1][0] for c in curves.values())
        at_step = {b: dict(c).get(last_step) for b, c in curves.items()}
        examples = min(b * c[-1][0] for b, c in curves.items())
        at_examples = {b: _interp([(b * s, q) for s, q in c], examples) for b, c in curves.items()}
        s_step, s_ex = _log_spread(list(at_step.values())), _log_spread(list(at_examples.values()))
        follows = None if s_step is None or s_ex is None else ("iterations" if s_step < s_ex else "examples")
        analysis["methods"][method] = {"step": last_step, "c_at_step": at_step, "spread_at_step": s_step,
                                       "examples": examples, "c_at_examples": at_examples,
                                       "spread_at_examples": s_ex, "follows": follows}  # fmt: skip
        cs = ", ".join(f"b{b}: {fmt(v, '.3g')}" for b, v in at_step.items())
        ce = ", ".join(f"b{b}: {fmt(v, '.3g')}" for b, v in at_examples.items())
        rows.append(f"| {method} | {cs} (step {last_step}) | {ce} ({examples} examples) | "
                    f"{fmt(s_step, '.2f')} / {fmt(s_ex, '.2f')} | {follows or '—'} |")  # fmt: skip
    table = [
        f"{p['steps']} steps at each batch size; c(P) every {p['every']} steps with {p['probes']} probes "
        "(lower = closer to the inverse curvature). Spread = ln(max/min) of c(P) across batch sizes: "
        "a smaller spread at equal steps than at equal examples means quality follows iterations.",
        "",
        "| method | c(P) at equal steps | c(P) at equal examples | spread steps / examples | follows |",
        "|---|---|---|---:|---|",
        *rows,
    ]
    figs = _plots(p, records, out)
    analysis["figures"] = figs
    table += ["", *[f"![{f}]({f})" for f in figs]]
    return "\n".join(table) + "\n", analysis


def _plots(p: dict[str, Any], records: list[Record], out: Path) -> list[str]:
    names = []
    for xkind, xlabel in (("steps", "optimizer steps"), ("examples", "training examples seen")):
        fname = f"fig_quality_vs_{xkind}.png"
        fig, axes = figure(out / fname, f"Preconditioner quality c(P) against {xlabel}, per batch size", xlabel,
                           "quality index c(P) (lower is better)", ncols=len(p["methods"]), ylog=True)  # fmt: skip
        for ax, method in zip(axes, p["methods"], strict=True):
            ax.set_title(method, fontsize=9)
            for r in select(records, method=method):
                c = _curve(r)
                if c:
                    scale = r.tags["batch"] if xkind == "examples" else 1
                    ax.plot([s * scale for s, _ in c], [q for _, q in c], marker=".", label=f"batch {r.tags['batch']}")
            ax.legend(fontsize=7)
        names.append(save(fig, out / fname))
    return names
