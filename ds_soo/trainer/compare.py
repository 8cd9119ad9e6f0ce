"""``--compare``: run every entry of the config's ``compare.runs`` and tabulate the results.

Each run is its own ``python -m ds_soo.train`` process, so peak memory, threads and seeds are per run
and one crashing run does not lose the others. Per-run overrides come from the config; command-line
overrides are applied after them and so win (e.g. ``train.epochs=5`` shortens every run). A list value
sweeps (``optim.lr=[1e-3,1e-2]``), ``--jobs N`` runs N at a time, and a rerun into the same folder skips
the runs that already finished (so an interrupted comparison resumes).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from ds_soo.config import ConfigError
from ds_soo.experiments.runner import RunSpec, run_all
from ds_soo.trainer.config import TrainConfig, build_config
from ds_soo.trainer.overrides import apply_overrides, expand_grid, load_raw, parse_override, swept_keys
from ds_soo.trainer.report import write_json


def _combo_name(combo: list[str], keys: list[str]) -> str:
    """``lr=0.01,batch_size=64`` from the swept overrides of one grid point."""
    parts = []
    for text in combo:
        key, value = parse_override(text)
        if key in keys:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value if not isinstance(value, float) else format(value, 'g')}")
    return ",".join(parts)


def plan(config: str | None, overrides: list[str], only: list[str] | None) -> list[tuple[str, list[str], TrainConfig]]:
    """(name, override strings, validated config) per run; validation happens before any run starts.

    A command-line override whose value is a list sweeps (``optim.lr=[1e-3,1e-2]``): every configured
    run is repeated at each grid point, named ``RUN@lr=0.001`` and so on.
    """
    raw = load_raw(config)
    grid = expand_grid(overrides)
    keys = swept_keys(overrides)
    cli0 = dict(parse_override(o) for o in grid[0])
    base = build_config(apply_overrides(raw, cli0))
    runs = base.compare.runs
    if not runs:
        raise ConfigError("compare.runs is empty: --compare needs runs (name -> overrides) in the config")
    names = list(runs)
    if only:
        unknown = [n for n in only if n not in runs]
        if unknown:
            raise ConfigError(f"--only: unknown run(s) {unknown}; compare.runs has {names}")
        names = [n for n in names if n in only]
    out = []
    for name in names:
        run_over = dict(runs[name])
        if "optim.name" not in run_over and name in ("adamw", "sgd", "kfac", "shampoo", "psgd"):
            run_over["optim.name"] = name
        for combo in grid:
            merged = {**run_over, **dict(parse_override(o) for o in combo)}
            label = name if len(grid) == 1 else f"{name}@{_combo_name(combo, keys)}"
            try:
                cfg = build_config(apply_overrides(raw, merged))
            except ConfigError as e:
                raise ConfigError(f"compare.runs.{label}: {e}") from None
            out.append((label, [f"{k}={json.dumps(v)}" for k, v in merged.items()], cfg))
    return out


def _row(name: str, ms: list[dict[str, Any]], dirs: list[Path] | None = None) -> dict[str, Any]:
    """One table row from a run's metrics over its seeds (mean and spread when there are several)."""
    from ds_soo.experiments.metrics import mean_step_time

    means = [mean_step_time(m, d) for m, d in zip(ms, dirs or [None] * len(ms), strict=True)]
    cfg = ms[0]["config"]
    losses = [m["final_eval"]["loss"] for m in ms]
    accs = [m["final_eval"].get("accuracy") for m in ms]
    row = {
        "run": name,
        "optim": cfg["optim"]["name"],
        "lr": cfg["optim"]["lr"],
        "batch": cfg["train"]["batch_size"],
        "steps": ms[0]["steps"],
        "epochs": ms[0]["epochs"],
        "seeds": len(ms),
        "eval_loss": _mean(losses),
        "eval_loss_std": _std(losses),
        "eval_accuracy": None if None in accs else _mean(accs),
        "eval_accuracy_std": None if None in accs else _std(accs),
        "final_train_loss": _mean([m["train_loss"][-1] if m["train_loss"] else None for m in ms]),
        "step_time_median_s": statistics.median(m["step_time_median_s"] for m in ms),
        # The mean includes the refresh steps the median hides: it is the amortised cost per step.
        "step_time_mean_s": None if None in means else statistics.fmean(means),
        "run_time_s": _mean([m["wall_time_s"] for m in ms]),
        "preconditioned_steps": ms[0]["preconditioned_steps"],
        "curvature_refreshes": ms[0]["curvature_refreshes"],
        "diverged": any(m["diverged"] for m in ms),
    }
    if len(ms) > 1:
        row["per_seed"] = [
            {"train_seed": m["config"]["train"]["seed"], "data_seed": m["config"]["data"]["seed"], **m["final_eval"]}
            for m in ms
        ]
    return row


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None or not math.isfinite(v) for v in values) else statistics.fmean(values)


def _std(values: list[float | None]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 and _mean(values) is not None else None


def _num(v: Any, fmt: str, std: float | None = None, scale: float = 1.0) -> str:
    if v is None:
        return "—"
    return format(scale * v, fmt) + ("" if std is None else f" ± {format(scale * std, fmt)}")


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| run | optimizer | lr | batch | steps | seeds | eval loss | eval acc % | train loss | step ms median "
        "| step ms mean | run s | precond steps | refresh steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error']} |" + " |" * 12)
            continue
        lines.append(
            f"| {r['run']} | {r['optim']} | {r['lr']:g} | {r['batch']} | {r['steps']} | {r['seeds']} "
            f"| {_num(r['eval_loss'], '.4f', r['eval_loss_std'])} "
            f"| {_num(r['eval_accuracy'], '.1f', r['eval_accuracy_std'], 100)} | {_num(r['final_train_loss'], '.4f')} "
            f"| {1e3 * r['step_time_median_s']:.1f} | {_num(r.get('step_time_mean_s'), '.1f', scale=1e3)} "
            f"| {r['run_time_s']:.1f} | {r['preconditioned_steps']} "
            f"| {r['curvature_refreshes']} |"
        )
    done = [r for r in rows if "error" not in r and r["eval_loss"] is not None]
    if done:
        best = min(done, key=lambda r: r["eval_loss"])
        lines += ["", f"Lowest eval loss: **{best['run']}** ({best['eval_loss']:.4f})."]
        if all(r["eval_accuracy"] is not None for r in done):
            top = max(done, key=lambda r: r["eval_accuracy"])
            lines.append(f"Highest eval accuracy: **{top['run']}** ({100 * top['eval_accuracy']:.1f}%).")
        if any(r["seeds"] == 1 for r in done):
            lines.append("One seed: differences of a few eval images are noise; `--seeds 3` repeats each run.")
    return "\n".join(lines) + "\n"


def run_compare(
    config: str | None,
    overrides: list[str],
    out_dir: Path,
    log: logging.Logger,
    only: list[str] | None = None,
    seeds: int | None = None,
    jobs: int = 1,
) -> int:
    """Run every compare entry (x grid point x seed), ``jobs`` at a time; finished runs are reused."""
    started = time.perf_counter()
    runs = plan(config, overrides, only)
    base = runs[0][2]
    n_seeds = seeds if seeds is not None else base.compare.seeds
    if n_seeds < 1:
        raise ConfigError(f"--seeds / compare.seeds must be >= 1, got {n_seeds}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    names = ", ".join(n for n, _, _ in runs)
    log.info("compare: %d runs (%s) x %d seed(s) into %s", len(runs), names, n_seeds, out_dir)
    specs: list[RunSpec] = []
    groups: dict[str, list[str]] = {}
    for name, run_over, cfg in runs:
        for i in range(n_seeds):
            seed_over = [] if n_seeds == 1 else [f"train.seed={cfg.train.seed + i}", f"data.seed={cfg.data.seed + i}"]
            out = out_dir / name if n_seeds == 1 else out_dir / name / f"seed{i}"
            key = name if n_seeds == 1 else f"{name}/seed{i}"
            specs.append(RunSpec(key, config, run_over + seed_over, out))
            groups.setdefault(name, []).append(key)
    if jobs > 1:
        log.info("compare: %d runs, %d at a time", len(specs), jobs)
    results = run_all(specs, jobs=jobs, isolated=True, print_fn=log.info)
    rows: list[dict[str, Any]] = []
    for name, keys in groups.items():
        failed = [results[k] for k in keys if results[k].metrics is None]
        if failed:
            log.error("run %s failed (%s)", failed[0].spec.name, failed[0].error)
            rows.append({"run": name, "error": failed[0].error})
            continue
        rows.append(_row(name, [results[k].metrics for k in keys], [results[k].spec.out for k in keys]))
    wall = time.perf_counter() - started
    d = base.data
    header = (
        f"## {d.source}: {base.model.kind} trained with batch {base.train.batch_size} "
        f"({len(rows)} runs x {n_seeds} seed(s), {wall:.0f} s total)"
    )
    table = markdown(rows, header)
    write_json(out_dir / "compare.json", {"rows": rows, "seeds": n_seeds, "wall_time_s": wall, "config": str(config)})
    (out_dir / "compare.md").write_text(table)
    print(table, flush=True)
    return 0 if all("error" not in r for r in rows) else 1
