"""``python -m ds_soo.experiments NAME --preset {smoke,small,full} [--jobs N] [key=value ...] --out DIR``

Runs the experiment's grid (methods x learning rates x its axis x seeds), ``--jobs`` runs at a time,
and writes ``results.json`` (every run's config and metrics), ``table.md`` and PNG figures to DIR.
Runs live in ``DIR/runs/NAME``; a rerun skips the finished ones, so an interrupted sweep resumes.
``key=value`` overrides apply to every run after the experiment's own (so they win); a list value
adds a grid axis. Exit status 2 means the configuration was rejected, 1 that some run failed.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import yaml

from ds_soo.config import ConfigError
from ds_soo.experiments import EXPERIMENTS
from ds_soo.experiments.base import PRESETS, Cell, Record
from ds_soo.experiments.metrics import summarise
from ds_soo.experiments.runner import RunSpec, make_pool, run_all
from ds_soo.trainer.overrides import expand_grid, parse_override, swept_keys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ds_soo.experiments",
        description="Reproduce one of the research's findings: a grid of runs, a table and figures.",
        epilog="example: python -m ds_soo.experiments batch_sweep --preset smoke --jobs 2 --out runs/batch_sweep",
    )
    p.add_argument("name", choices=sorted(EXPERIMENTS), help="the experiment")
    p.add_argument("--preset", choices=PRESETS, default="smoke", help="size: smoke (CI), small (CPU), full (GPU)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--out", help="output directory (default runs/experiments/NAME-PRESET)")
    p.add_argument("--repeat-seeds", metavar="SEEDS",
                   help="early_curvature: the seeds at which the best fixed and the best auto cell are "
                        "repeated and paired, e.g. 1-25 or 1,2,3 (default: the preset's)")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every run; a list sweeps")
    return p.parse_intermixed_args(argv)


def parse_seeds(text: str) -> list[int]:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]``; a ConfigError names the flag and the accepted form."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first < 0 or last < first:
                raise ValueError(part)
            seeds += range(first, last + 1)
    except ValueError:
        raise ConfigError(f"--repeat-seeds: {text!r} is not accepted: give seeds >= 0 as a list and ranges, "
                          "e.g. 1-25 or 1,2,3") from None  # fmt: skip
    return sorted(set(seeds))


def _specs(cells: list[Cell], grid: list[list[str]], keys: list[str], base_file: Path, out: Path) -> list[RunSpec]:
    specs = []
    for cell in cells:
        for combo in grid:
            suffix = ""
            if len(grid) > 1:
                parts = [o for o in combo if parse_override(o)[0] in keys]
                suffix = "@" + ",".join(p.split(".")[-1] for p in parts)
            name = cell.name + suffix
            tags = {**cell.tags, **({"user": suffix[1:]} if suffix else {})}
            specs.append(RunSpec(name, str(base_file), cell.override_strings() + combo, out / "runs" / name, tags))
    return specs


def _validate(specs: list[RunSpec]) -> None:
    """Every run's config is checked before the first run starts; the error names the run and field."""
    from ds_soo.trainer.config import load_config

    for spec in specs:
        try:
            load_config(spec.config, spec.overrides)
        except ConfigError as e:
            raise ConfigError(f"run {spec.name}: {e}") from None


def _stages(cells_of, preset, grid, keys, base_file, out, jobs, pool) -> tuple[dict[str, Record], list[str]]:
    """Run the experiment's grid stage by stage: a later stage's cells may depend on earlier results."""
    records: dict[str, Record] = {}
    ordered: list[str] = []
    stage = 0
    while True:
        cells = cells_of(preset, [records[n] for n in ordered])
        specs = [s for s in _specs(cells, grid, keys, base_file, out) if s.name not in records]
        if not specs:
            return records, ordered
        stage += 1
        _validate(specs)
        print(f"stage {stage}: {len(specs)} runs, {jobs} at a time", flush=True)
        for res in run_all(specs, jobs=jobs, pool=pool).values():
            spec = res.spec
            records[spec.name] = Record(spec.name, spec.tags, spec.overrides, spec.out, res.metrics,
                                        summarise(res.metrics, spec.out), res.error)  # fmt: skip
            ordered.append(spec.name)


def run_experiment(
    name: str,
    preset: str,
    out: Path,
    jobs: int = 1,
    overrides: list[str] | None = None,
    pool: Executor | None = None,
    repeat_seeds: list[int] | None = None,
) -> int:
    """Run (or resume) experiment ``name`` into ``out``; returns 0 when every run finished.

    ``pool`` (:func:`ds_soo.experiments.runner.make_pool` with the same ``jobs``) lets several
    experiments share workers that have already imported torch.
    """
    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {list(PRESETS)}, got {preset!r}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    exp = EXPERIMENTS[name]
    cells_of = exp.cells
    if repeat_seeds is not None:
        takes = [n for n, m in EXPERIMENTS.items() if "repeat_seeds" in inspect.signature(m.cells).parameters]
        if name not in takes:
            raise ConfigError(f"--repeat-seeds applies to {takes}, not {name}")
        cells_of = functools.partial(exp.cells, repeat_seeds=repeat_seeds)
    overrides = list(overrides or [])
    grid, keys = expand_grid(overrides), swept_keys(overrides)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base_file = out / "base.yaml"
    base_file.write_text(f"# {name} ({preset} preset): the config every run starts from\n"
                         + yaml.safe_dump(exp.base(preset), sort_keys=False))  # fmt: skip
    print(f"{name} ({preset}): {exp.QUESTION}", flush=True)
    own = pool is None
    pool = make_pool(jobs) if pool is None else pool
    try:
        records, ordered = _stages(cells_of, preset, grid, keys, base_file, out, jobs, pool)
    finally:
        if own:
            pool.shutdown()
    done = [records[n] for n in ordered]
    table, analysis = exp.report(preset, done, out)
    wall = time.perf_counter() - started
    failed = [r.name for r in done if r.metrics is None]
    # A resumed sweep's invocation time says little about its cost; each run's own time does.
    run_seconds = sum(float((r.metrics or {}).get("wall_time_s") or 0.0) for r in done)
    header = (f"# {name} ({preset} preset)\n\n{exp.QUESTION}\n\n"
              f"{len(done)} runs ({len(failed)} failed), {run_seconds:.0f} s of training summed over runs, "
              f"{wall:.0f} s wall clock for this invocation "
              f"with --jobs {jobs}. Command: `python -m ds_soo.experiments {name} --preset {preset}"
              f"{_seeds_flag(repeat_seeds)}{''.join(' ' + o for o in overrides)}`.\n\n")  # fmt: skip
    (out / "table.md").write_text(header + table)
    results: dict[str, Any] = {
        "experiment": name,
        "preset": preset,
        "question": exp.QUESTION,
        "overrides": overrides,
        "wall_time_s": wall,
        "analysis": analysis,
        "runs": [
            {
                "name": r.name,
                "tags": r.tags,
                "overrides": r.overrides,
                "error": r.error,
                "summary": {k: v for k, v in r.summary.items() if k not in ("eval_history", "quality_index")},
                "metrics": r.metrics,
            }
            for r in done
        ],  # fmt: skip
    }
    from ds_soo.trainer.report import write_json

    write_json(out / "results.json", results)
    print(header + table, flush=True)
    return 1 if failed else 0


def _seeds_flag(seeds: list[int] | None) -> str:
    return "" if seeds is None else " --repeat-seeds " + ",".join(map(str, seeds))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or f"runs/experiments/{args.name}-{args.preset}")
    try:
        seeds = parse_seeds(args.repeat_seeds) if args.repeat_seeds is not None else None
        return run_experiment(args.name, args.preset, out, args.jobs, args.overrides, repeat_seeds=seeds)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
