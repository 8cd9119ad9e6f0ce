"""Finding 5 (Fig. 5): the best damping grows with batch size and learning rate.

Stage 1 finds the best K-FAC damping (lowest final eval loss over a grid of values) for every
(batch, lr) cell and fits a power law ``rho* = rho0 (B/B0)^a (lr/lr0)^b`` by least squares in log
space (B0, lr0 = geometric means of the grid). Stage 2 trains every cell with the ``scaled`` damping
rule using the fitted constants, and compares it with the per-cell best and with the best single
constant damping. The fit and the comparison use the same cells (in-sample), and the per-cell best is
quantised to the damping grid, so this checks the rule's shape, not its out-of-sample accuracy. The lr
schedule is constant (no warmup) so that the rule sees the cell's own lr throughout.

Stage 3 trains every cell with ``adaptive`` damping (Levenberg-Marquardt, from K-FAC's default
1e-3), which needs no fit; the report compares, per batch size at each rule's best lr, the default
constant damping, the best single constant, the fitted ``scaled`` rule and ``adaptive``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ds_soo.experiments.base import (
    Cell,
    Record,
    best_by,
    cifar_base,
    figure,
    fmt,
    lr_tag,
    method_overrides,
    save,
    select,
    value_ticks,
)

NAME = "damping"
QUESTION = "Does the best damping grow with batch size and learning rate, and does the fitted `scaled` rule match it?"

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"model": (16, 1), "train_size": 256, "eval_size": 128, "epochs": 2, "batches": [32, 128],
              "lrs": [0.03, 0.3], "dampings": [1e-3, 1e-1], "method": "kfac"},
    "small": {"model": (32, 2), "train_size": 2000, "eval_size": 1000, "epochs": 10, "batches": [32, 128, 512],
              "lrs": [0.03, 0.1, 0.3], "dampings": [1e-4, 1e-3, 1e-2, 1e-1, 1.0], "method": "kfac"},
    "full": {"model": (192, 6), "train_size": None, "eval_size": None, "epochs": 20, "batches": [128, 512, 2048],
             "lrs": [0.01, 0.03, 0.1, 0.3], "dampings": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0], "method": "kfac"},
}  # fmt: skip


def base(preset: str) -> dict[str, Any]:
    p = PRESETS[preset]
    cfg = cifar_base(*p["model"], p["train_size"], p["eval_size"], p["batches"][0])
    cfg["train"]["epochs"] = p["epochs"]
    cfg["optim"].update({"schedule": "constant", "warmup_steps": 0})
    return cfg


def _geo(values: list[float]) -> float:
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))


def fit_power_law(points: list[tuple[float, float, float]], b0: float, lr0: float) -> dict[str, float]:
    """Least squares of log10 rho* = c + a log10(B/B0) + b log10(lr/lr0); an axis with one value gets 0."""
    x = np.array([[1.0, math.log10(b / b0), math.log10(lr / lr0)] for b, lr, _ in points])
    y = np.array([math.log10(rho) for _, _, rho in points])
    used = [0] + [j for j in (1, 2) if np.ptp(x[:, j]) > 0]
    coef, *_ = np.linalg.lstsq(x[:, used], y, rcond=None)
    full = dict.fromkeys((0, 1, 2), 0.0)
    full.update({j: float(c) for j, c in zip(used, coef, strict=True)})
    pred = x @ np.array([full[0], full[1], full[2]])
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {"rho0": 10 ** full[0], "batch_exponent": full[1], "lr_exponent": full[2], "ref_batch_size": b0,
            "ref_lr": lr0, "r2": r2, "points": len(points)}  # fmt: skip


def _stage1(p: dict[str, Any]) -> list[Cell]:
    out = []
    for b in p["batches"]:
        for lr in p["lrs"]:
            for rho in p["dampings"]:
                over = {**method_overrides(p["method"], lr), "train.batch_size": b, "precond.damping.value": rho}
                out.append(Cell(f"b{b}-lr{lr_tag(lr)}-d{rho:g}", over, {"batch": b, "lr": lr, "damping": rho,
                                                                       "stage": 1}))  # fmt: skip
    return out


def _best_points(p: dict[str, Any], records: list[Record]) -> list[tuple[float, float, float]]:
    pts = []
    for b in p["batches"]:
        for lr in p["lrs"]:
            best = best_by(select(records, batch=b, lr=lr, stage=1))
            if best is not None:
                pts.append((b, lr, best.tags["damping"]))
    return pts


def _stage3(p: dict[str, Any]) -> list[Cell]:
    """Adaptive damping in every (batch, lr) cell, from the method's default starting value."""
    return [
        Cell(f"b{b}-lr{lr_tag(lr)}-adaptive",
             {**method_overrides(p["method"], lr), "train.batch_size": b, "precond.damping.kind": "adaptive"},
             {"batch": b, "lr": lr, "stage": 3})
        for b in p["batches"] for lr in p["lrs"]
    ]  # fmt: skip


def cells(preset: str, records: list[Record]) -> list[Cell]:
    p = PRESETS[preset]
    out = _stage1(p) + _stage3(p)
    if not {c.name for c in _stage1(p)} <= {r.name for r in records}:
        return out
    pts = _best_points(p, records)
    if len(pts) < 2:
        return out
    fit = fit_power_law(pts, _geo(p["batches"]), _geo(p["lrs"]))
    for b in p["batches"]:
        for lr in p["lrs"]:
            over = {**method_overrides(p["method"], lr), "train.batch_size": b, "precond.damping.kind": "scaled",
                    "precond.damping.value": fit["rho0"], "precond.damping.ref_batch_size": fit["ref_batch_size"],
                    "precond.damping.ref_lr": fit["ref_lr"], "precond.damping.batch_exponent": fit["batch_exponent"],
                    "precond.damping.lr_exponent": fit["lr_exponent"]}  # fmt: skip
            out.append(Cell(f"b{b}-lr{lr_tag(lr)}-scaled", over, {"batch": b, "lr": lr, "stage": 2}))
    return out


def report(preset: str, records: list[Record], out: Path) -> tuple[str, dict[str, Any]]:
    p = PRESETS[preset]
    pts = _best_points(p, records)
    fit = fit_power_law(pts, _geo(p["batches"]), _geo(p["lrs"])) if len(pts) >= 2 else None
    # The best single constant damping: lowest mean eval loss over all cells.
    const = {}
    for rho in p["dampings"]:
        losses = [r.summary["eval_loss"] for r in select(records, damping=rho, stage=1)]
        const[rho] = sum(losses) / len(losses) if losses else math.inf
    best_const = min(const, key=const.get) if const else None
    rows, cmp = [], []
    for b in p["batches"]:
        for lr in p["lrs"]:
            best = best_by(select(records, batch=b, lr=lr, stage=1))
            scaled = next(iter(select(records, batch=b, lr=lr, stage=2)), None)
            fixed = next(iter(select(records, batch=b, lr=lr, damping=best_const, stage=1)), None)
            rule = (fit["rho0"] * (b / fit["ref_batch_size"]) ** fit["batch_exponent"]
                    * (lr / fit["ref_lr"]) ** fit["lr_exponent"]) if fit else None  # fmt: skip
            e_best = best.summary["eval_loss"] if best else math.inf
            e_scaled = scaled.summary["eval_loss"] if scaled else math.inf
            e_const = fixed.summary["eval_loss"] if fixed else math.inf
            cmp.append({"batch": b, "lr": lr, "best_damping": best.tags["damping"] if best else None,
                        "rule_damping": rule, "best_eval_loss": e_best, "scaled_eval_loss": e_scaled,
                        "best_constant_eval_loss": e_const})  # fmt: skip
            rows.append(
                f"| {b} | {lr:g} | {fmt(best.tags['damping'] if best else None, 'g')} | {fmt(rule, '.3g')} "
                f"| {fmt(e_best, '.4f')} | {fmt(e_scaled, '.4f')} | {fmt(e_const, '.4f')} |"
            )
    finite = [c for c in cmp if all(math.isfinite(c[k]) for k in ("best_eval_loss", "scaled_eval_loss"))]
    regret_scaled = sum(c["scaled_eval_loss"] - c["best_eval_loss"] for c in finite) / len(finite) if finite else None
    finite_c = [c for c in cmp if math.isfinite(c["best_constant_eval_loss"]) and math.isfinite(c["best_eval_loss"])]
    regret_const = (sum(c["best_constant_eval_loss"] - c["best_eval_loss"] for c in finite_c) / len(finite_c)
                    if finite_c else None)  # fmt: skip
    analysis = {"fit": fit, "best_constant_damping": best_const, "cells": cmp,
                "mean_regret_scaled": regret_scaled, "mean_regret_best_constant": regret_const}  # fmt: skip
    fit_line = (
        f"Fitted rule: rho* = {fit['rho0']:.3g} x (B/{fit['ref_batch_size']:.0f})^{fit['batch_exponent']:.2f} "
        f"x (lr/{fit['ref_lr']:.3g})^{fit['lr_exponent']:.2f} (R^2 {fit['r2']:.2f} over {fit['points']} cells)."
        if fit
        else "Too few cells trained to fit the power law."
    )
    table = [
        f"{p['method']}, {p['epochs']} epochs on {p['train_size'] or 50000} images, constant lr. Damping grid "
        f"{', '.join(f'{d:g}' for d in p['dampings'])}; best constant damping over all cells: {fmt(best_const, 'g')}.",
        "",
        fit_line,
        "",
        "| batch | lr | best damping | rule damping | eval loss (best) | eval loss (scaled rule) "
        "| eval loss (best constant) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Mean eval-loss regret against the per-cell best: scaled rule {fmt(regret_scaled, '+.4f')}, "
        f"best constant damping {fmt(regret_const, '+.4f')}.",
    ]
    rules_rows, rules = _rules_by_batch(p, records, best_const)
    analysis["rules_by_batch"] = rules
    table += [
        "",
        "Per batch size, each damping rule at its best lr (eval loss; the lr in brackets). `default` is K-FAC's "
        "constant 1e-3, `best constant` the single value best over all cells, `scaled` the fitted rule above "
        "(in-sample), `adaptive` the Levenberg-Marquardt rule started from 1e-3 (no fit).",
        "",
        "| batch | default 1e-3 | best constant | scaled (fitted) | adaptive | adaptive's final damping |",
        "|---:|---:|---:|---:|---:|---:|",
        *rules_rows,
    ]
    figs = _plots(p, cmp, fit, out)
    analysis["figures"] = figs
    table += ["", *[f"![{f}]({f})" for f in figs]]
    return "\n".join(table) + "\n", analysis


def _rules_by_batch(
    p: dict[str, Any], records: list[Record], best_const: float | None
) -> tuple[list[str], list[dict[str, Any]]]:
    """Each rule's best-lr eval loss per batch size (None where a rule has no finished run)."""
    rows, out = [], []
    default = 1e-3
    for b in p["batches"]:
        picks = {
            "default": best_by(select(records, batch=b, damping=default, stage=1)),
            "best_constant": best_by(select(records, batch=b, damping=best_const, stage=1)),
            "scaled": best_by(select(records, batch=b, stage=2)),
            "adaptive": best_by(select(records, batch=b, stage=3)),
        }
        entry: dict[str, Any] = {"batch": b}
        cells_ = []
        for key, rec in picks.items():
            entry[key] = None if rec is None else {"eval_loss": rec.summary["eval_loss"], "lr": rec.tags["lr"]}
            cells_.append("n/a" if rec is None else f"{rec.summary['eval_loss']:.4f} ({rec.tags['lr']:g})")
        ad = picks["adaptive"]
        final = None if ad is None else ad.summary.get("final_damping")
        entry["adaptive_final_damping"] = final
        rows.append(f"| {b} | {' | '.join(cells_)} | {fmt(final, '.3g')} |")
        out.append(entry)
    return rows, out


def _plots(p: dict[str, Any], cmp: list[dict[str, Any]], fit: dict[str, float] | None, out: Path) -> list[str]:
    fig, (ax,) = figure(out, "Best damping per (batch, lr) and the fitted power law", "batch size (images per step)",
                        "best damping rho* (grid value)", xlog=True, ylog=True)  # fmt: skip
    for lr in p["lrs"]:
        pts = [(c["batch"], c["best_damping"]) for c in cmp if c["lr"] == lr and c["best_damping"]]
        if not pts:
            continue
        line = ax.plot([b for b, _ in pts], [d for _, d in pts], marker="o", ls="", label=f"lr {lr:g} best")
        if fit:
            bs = np.geomspace(min(p["batches"]), max(p["batches"]), 20)
            ys = fit["rho0"] * (bs / fit["ref_batch_size"]) ** fit["batch_exponent"] * (
                lr / fit["ref_lr"]) ** fit["lr_exponent"]  # fmt: skip
            ax.plot(bs, ys, color=line[0].get_color(), lw=1, label=f"lr {lr:g} fit")
    value_ticks(ax, p["batches"])
    ax.legend(fontsize=7)
    names = [save(fig, out / "fig_best_damping.png")]
    fig, (ax,) = figure(out, "Scaled damping rule against the per-cell best damping",
                        "eval loss, per-cell best damping (nats)", "eval loss, fitted rule (nats)")  # fmt: skip
    pts = [(c["best_eval_loss"], c["scaled_eval_loss"], c["best_constant_eval_loss"]) for c in cmp]
    ok = [q for q in pts if math.isfinite(q[0]) and math.isfinite(q[1])]
    if ok:
        ax.scatter([q[0] for q in ok], [q[1] for q in ok], label="scaled rule")
        okc = [q for q in ok if math.isfinite(q[2])]
        ax.scatter([q[0] for q in okc], [q[2] for q in okc], marker="x", label="best constant damping")
        lo, hi = min(q[0] for q in ok), max(max(q[1] for q in ok), max(q[0] for q in ok))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, label="equal")
        ax.legend(fontsize=7)
    names.append(save(fig, out / "fig_scaled_vs_best.png"))
    return names
