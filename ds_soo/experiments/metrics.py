"""Reading a finished run's ``metrics.json`` (and its TensorBoard scalars where needed) into numbers.

Per-step times come from ``metrics.json`` when it holds them; older runs only logged them to
TensorBoard (``train/step_time_s`` every ``train.log_interval`` steps), which is read as a fallback.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

STEP_TIME_KEYS = ("step_times_s", "step_times", "step_time_s")


def step_times(metrics: dict[str, Any], run_dir: Path | None = None) -> list[float] | None:
    """Every optimizer step's seconds, from metrics.json or (fallback) the run's TensorBoard scalars."""
    for key in STEP_TIME_KEYS:
        value = metrics.get(key)
        if isinstance(value, list) and value:
            return [float(v) for v in value]
    if run_dir is None or not (run_dir / "tb").is_dir():
        return None
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/step_time_s" not in acc.Tags().get("scalars", []):
        return None
    events = acc.Scalars("train/step_time_s")
    steps = metrics.get("steps")
    if steps is not None and len(events) != steps:
        return None  # logged every log_interval steps only: not every step's time
    return [e.value for e in sorted(events, key=lambda e: e.step)]


def mean_step_time(metrics: dict[str, Any], run_dir: Path | None = None) -> float | None:
    """The mean step time (refreshes included, so amortised), or None when per-step times are unknown."""
    if isinstance(metrics.get("step_time_mean_s"), int | float):
        return float(metrics["step_time_mean_s"])
    times = step_times(metrics, run_dir)
    return statistics.fmean(times) if times else None


def finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def summarise(metrics: dict[str, Any] | None, run_dir: Path | None = None) -> dict[str, Any]:
    """The numbers the experiment tables use; a failed or diverged run has eval_loss = inf."""
    if metrics is None:
        return {"ok": False, "eval_loss": math.inf, "eval_accuracy": None}
    ev = metrics.get("final_eval", {})
    loss = ev.get("loss")
    train = [v for v in metrics.get("train_loss", []) if finite(v)]
    tail = train[-max(1, len(train) // 10) :] if train else []
    times = step_times(metrics, run_dir)
    out = {
        "ok": True,
        "diverged": bool(metrics.get("diverged")),
        "eval_loss": float(loss) if finite(loss) and not metrics.get("diverged") else math.inf,
        "eval_accuracy": ev.get("accuracy"),
        # The mean of the last 10% of steps: one batch's loss is too noisy to set against eval loss.
        "train_loss": statistics.fmean(tail) if tail else None,
        "steps": metrics.get("steps"),
        "epochs": metrics.get("epochs"),
        "num_train": metrics.get("data", {}).get("num_train"),
        "step_time_median_s": metrics.get("step_time_median_s"),
        "step_time_mean_s": mean_step_time(metrics, run_dir),
        "train_time_s": sum(times) if times else None,
        "curvature_refreshes": metrics.get("curvature_refreshes"),
        "block_refreshes": metrics.get("block_refreshes"),
        "eval_history": metrics.get("eval_history", []),
        "quality_index": metrics.get("quality_index", []),
        # The damping of the last step (for damping.kind adaptive: where the rule left it).
        "final_damping": metrics.get("precond_metrics", {}).get("damping"),
    }
    return out


def steps_to_target(summary: dict[str, Any], target: float, metrics: dict[str, Any] | None = None,
                    run_dir: Path | None = None) -> tuple[int | None, float | None]:  # fmt: skip
    """(first evaluated step with eval loss <= target, training seconds up to it), or (None, None)."""
    for point in summary.get("eval_history", []):
        if finite(point.get("loss")) and point["loss"] <= target:
            step = int(point["step"])
            times = step_times(metrics, run_dir) if metrics is not None else None
            if times:
                return step, sum(times[:step])
            mean = summary.get("step_time_mean_s") or summary.get("step_time_median_s")
            return step, (mean * step if mean else None)
    return None, None
