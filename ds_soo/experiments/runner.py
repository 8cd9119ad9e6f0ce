"""Run many training runs (in parallel, resumably) and collect their ``metrics.json``.

A run is one ``ds_soo.train`` invocation in its own folder. It counts as finished when the folder
holds ``metrics.json`` and ``spec.json`` (written after the run succeeded) records the same command, so
a rerun of a sweep skips finished runs and restarts unfinished ones from scratch in a cleared folder.

Two ways to launch: ``isolated=True`` starts a fresh ``python -m ds_soo.train`` process per run
(``--compare``); otherwise a pool of ``jobs`` worker processes each imports torch and transformers
once and calls ``ds_soo.train.main`` per run, which saves ~8 s of start-up per run on a CPU.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.json"


@dataclass
class RunSpec:
    """One run: its name, config file, overrides (``key=value`` strings) and folder; tags describe it."""

    name: str
    config: str | None
    overrides: list[str]
    out: Path
    tags: dict[str, Any] = field(default_factory=dict)

    def argv(self) -> list[str]:
        cfg = ["--config", str(self.config)] if self.config else []
        return [*cfg, *self.overrides, "train.progress=false", "--out", str(self.out), "--quiet"]

    def identity(self) -> dict[str, Any]:
        return {"config": str(self.config) if self.config else None, "overrides": list(self.overrides)}


@dataclass
class RunResult:
    spec: RunSpec
    metrics: dict[str, Any] | None
    error: str = ""
    seconds: float = 0.0
    reused: bool = False


def finished(spec: RunSpec) -> dict[str, Any] | None:
    """The run's metrics if it already completed with this exact command, else None."""
    metrics, spec_file = spec.out / METRICS_FILE, spec.out / SPEC_FILE
    if not (metrics.is_file() and spec_file.is_file()):
        return None
    try:
        if json.loads(spec_file.read_text()) != spec.identity():
            return None
        return json.loads(metrics.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _prepare(spec: RunSpec) -> None:
    """A clean folder for a (re)started run: a half-written run is not continued but redone."""
    if spec.out.exists():
        owned = [spec.out / SPEC_FILE, spec.out / "train.log", spec.out / METRICS_FILE]
        if any(spec.out.iterdir()) and not any(p.exists() for p in owned):
            raise RuntimeError(f"{spec.out} holds files that are not a training run; refusing to clear it")
        shutil.rmtree(spec.out)
    spec.out.parent.mkdir(parents=True, exist_ok=True)


def _collect(spec: RunSpec, code: int, tail: str) -> tuple[dict[str, Any] | None, str]:
    metrics_file = spec.out / METRICS_FILE
    # Exit 3: the run diverged; its metrics say so, and a sweep must see that lr as a (bad) result.
    if code not in (0, 3) or not metrics_file.is_file():
        return None, f"exit {code}: {tail or 'no output'}"
    # Written last, so that a run only counts as finished (and is skipped on a rerun) once complete.
    (spec.out / SPEC_FILE).write_text(json.dumps(spec.identity(), indent=1))
    return json.loads(metrics_file.read_text()), ""


def _subprocess_run(spec: RunSpec, threads: int | None = None) -> tuple[dict[str, Any] | None, str]:
    """One run in a fresh process; ``threads`` caps its intra-op threads (its share of the CPUs when
    several run at once: oversubscribed cores made each run several times slower)."""
    cmd = [sys.executable, "-m", "ds_soo.train", *spec.argv()]
    env = {**os.environ} if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = proc.stdout.strip().splitlines()
    return _collect(spec, proc.returncode, lines[-1] if lines else "")


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _worker_run(spec: RunSpec) -> tuple[dict[str, Any] | None, str]:
    from ds_soo.train import main

    try:
        code = main(spec.argv())
    except SystemExit as e:  # argparse errors
        code = int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - one failing run must not end the sweep
        return None, f"{type(e).__name__}: {e}"
    log_file = spec.out / "train.log"
    tail = log_file.read_text().strip().splitlines()[-1] if log_file.is_file() else ""
    return _collect(spec, code, tail)


def threads_per_job(jobs: int) -> int:
    """Intra-op threads per parallel run: the CPUs shared out, or OMP_NUM_THREADS when set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // jobs)


def _fmt_seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def progress_line(i: int, n: int, r: RunResult, elapsed: float, eta: float | None) -> str:
    if r.metrics is None:
        what = f"FAILED ({r.error})"
    else:
        ev = r.metrics.get("final_eval", {})
        what = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items())
        what += " (already done)" if r.reused else f" in {r.seconds:.1f} s"
    left = "" if eta is None else f", ~{_fmt_seconds(eta)} left"
    return f"[{i}/{n}] {r.spec.name}: {what}  [{_fmt_seconds(elapsed)} elapsed{left}]"


def make_pool(jobs: int, isolated: bool = False) -> Executor:
    """Threads that each wait on a fresh process (``isolated``), or ``jobs`` long-lived worker processes."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if isolated:
        return ThreadPoolExecutor(max_workers=jobs)
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads_per_job(jobs),))


def run_all(
    specs: list[RunSpec],
    jobs: int = 1,
    isolated: bool = False,
    print_fn: Callable[[str], None] = lambda s: print(s, flush=True),
    pool: Executor | None = None,
) -> dict[str, RunResult]:
    """Run every spec (finished ones are reused), ``jobs`` at a time; a progress line per run.

    ``pool`` (from :func:`make_pool`, with the same ``jobs`` and ``isolated``) is reused when given, so
    several stages of a sweep pay the workers' start-up once.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("run names must be unique")
    started = time.perf_counter()
    results: dict[str, RunResult] = {}
    todo = []
    n = len(specs)
    for spec in specs:
        metrics = finished(spec)
        if metrics is not None:
            results[spec.name] = RunResult(spec, metrics, reused=True)
            print_fn(progress_line(len(results), n, results[spec.name], time.perf_counter() - started, None))
        else:
            todo.append(spec)
    if not todo:
        return results
    for spec in todo:
        _prepare(spec)
    own = pool is None
    executor = make_pool(jobs, isolated) if pool is None else pool
    # Parallel isolated runs share the CPUs like pooled workers do; one run alone keeps torch's default.
    shared = threads_per_job(jobs) if jobs > 1 or os.environ.get("OMP_NUM_THREADS") else None
    fn = functools.partial(_subprocess_run, threads=shared) if isolated else _worker_run
    durations: list[float] = []
    try:
        pending: dict[Future, tuple[RunSpec, float]] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                spec = queue.pop(0)
                try:
                    pending[executor.submit(fn, spec)] = (spec, time.perf_counter())
                except RuntimeError as e:  # a worker died and broke the pool: the rest fail, a rerun resumes
                    results[spec.name] = RunResult(spec, None, f"not started: {type(e).__name__}: {e}")
                    print_fn(progress_line(len(results), n, results[spec.name], time.perf_counter() - started, None))
            if not pending:
                continue
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                spec, t0 = pending.pop(fut)
                try:
                    metrics, error = fut.result()
                except Exception as e:  # noqa: BLE001 - a crashed worker fails its run, not the sweep
                    metrics, error = None, f"{type(e).__name__}: {e}"
                seconds = time.perf_counter() - t0
                durations.append(seconds)
                results[spec.name] = RunResult(spec, metrics, error, seconds)
                left = len(queue) + len(pending)
                eta = sum(durations) / len(durations) * left / jobs if left else None
                print_fn(progress_line(len(results), n, results[spec.name], time.perf_counter() - started, eta))
    finally:
        if own:
            executor.shutdown()
    return {s.name: results[s.name] for s in specs}
