"""What every experiment shares: presets, grid cells, the methods' learning-rate grids, base configs.

An experiment module defines ``NAME``, ``QUESTION``, ``base(preset)`` (a raw trainer config),
``cells(preset, records)`` (the grid; called again after each stage with the finished records, so a
later stage can depend on an earlier one) and ``report(preset, records, out)`` (tables and figures).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESETS = ("smoke", "small", "full")


@dataclass
class Cell:
    """One run of the grid: a unique name, its overrides (dotted keys) and tags for the report."""

    name: str
    overrides: dict[str, Any]
    tags: dict[str, Any] = field(default_factory=dict)

    def override_strings(self) -> list[str]:
        return [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()]


@dataclass
class Record:
    """A finished (or failed) run as the report sees it."""

    name: str
    tags: dict[str, Any]
    overrides: list[str]
    out: Path
    metrics: dict[str, Any] | None
    summary: dict[str, Any]
    error: str = ""


# Learning-rate grids: half-decade steps around the values that train this ViT. ``lrs`` is the core grid
# (experiments pick from it by index); ``edge_lrs`` extends it past each edge that a method's best lr
# landed on in the small batch sweep (AdamW at the top, K-FAC, Shampoo and PSGD at the bottom, Shampoo
# also at the top), so that a sweep over every value leaves no method's best on the grid's edge.
METHODS: dict[str, dict[str, Any]] = {
    "adamw": {"lrs": [1e-3, 3e-3, 1e-2], "edge_lrs": [3e-2], "overrides": {}},
    "sgd": {"lrs": [0.03, 0.1, 0.3], "edge_lrs": [], "overrides": {"optim.grad_clip": 1.0}},
    "kfac": {"lrs": [0.03, 0.1, 0.3], "edge_lrs": [0.01],
             "overrides": {"optim.grad_clip": 1.0, "precond.damping.value": 1e-3}},
    "shampoo": {"lrs": [3e-4, 1e-3, 3e-3], "edge_lrs": [1e-4, 1e-2], "overrides": {}},
    # 0.03-0.3 (the digits quickstart's range) diverged on CIFAR-10 at every batch size.
    "psgd": {"lrs": [1e-3, 3e-3, 1e-2], "edge_lrs": [3e-4], "overrides": {"optim.grad_clip": 1.0}},
}  # fmt: skip


def method_lrs(method: str, pick: list[int] | str) -> list[float]:
    """The method's lrs at the core grid's indices ``pick``, or ``"all"``: core and edge values, sorted."""
    spec = METHODS[method]
    if pick == "all":
        return sorted(spec["lrs"] + spec["edge_lrs"])
    return [spec["lrs"][i] for i in pick]
SECOND_ORDER = ("kfac", "shampoo", "psgd")


def method_overrides(method: str, lr: float) -> dict[str, Any]:
    return {"optim.name": method, "optim.lr": lr, **METHODS[method]["overrides"]}


def lr_tag(lr: float) -> str:
    return format(lr, "g")


# The study refreshes every block on the same step, so the experiments do too (``stagger: false``;
# the default spreads sparse-phase refreshes over the interval, which changes no count, only the steps).
STUDY_SCHEDULE = {"warm_steps": 50, "warm_interval": 5, "sparse_interval": 10, "stagger": False}


def cifar_base(hidden: int, layers: int, train_size: int | None, eval_size: int | None, batch: int) -> dict[str, Any]:
    """A small ViT on CIFAR-10 (the shared JPEG q75 copy), 4x4 patches (64 tokens)."""
    return {
        "model": {"kind": "vit", "hidden_size": hidden, "num_layers": layers, "num_heads": 4, "patch_size": 4},
        # The cifar10 source decodes the JPEGs per run (cached once decoded in full). The trainer's
        # array-backed ``npz`` image source, where available, is the one to use here: no decode per run.
        "data": {"source": "cifar10", "train_size": train_size, "eval_size": eval_size, "seed": 0},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": 0},
        "train": {"batch_size": batch, "epochs": 1, "steps": None, "eval_interval": 0, "log_interval": 1},
        # 10 refreshes every 5 steps, then every 10 (statistics every 10 steps throughout, the default).
        "precond": {"schedule": dict(STUDY_SCHEDULE)},
    }


def shakespeare_base(hidden: int, layers: int, block: int, train_chars: int | None, batch: int) -> dict[str, Any]:
    """A small character GPT on Tiny Shakespeare: the first ``train_chars`` of the training 90%."""
    return {
        "model": {"kind": "gpt", "hidden_size": hidden, "num_layers": layers, "num_heads": 4},
        "data": {
            "source": "shakespeare",
            "block_size": block,
            "eval_fraction": 0.1,
            "eval_windows": 128,
            "train_size": train_chars,
            "seed": 0,
        },  # fmt: skip
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": 0},
        "train": {"batch_size": batch, "epochs": None, "steps": 100, "eval_interval": 0, "log_interval": 1},
        "precond": {"schedule": dict(STUDY_SCHEDULE)},
    }


def best_by(records: list[Record], key: str = "eval_loss") -> Record | None:
    """The record with the lowest finite ``key`` (failed and diverged runs never win)."""
    ok = [r for r in records if math.isfinite(r.summary.get(key, math.inf))]
    return min(ok, key=lambda r: r.summary[key]) if ok else None


def select(records: list[Record], **tags: Any) -> list[Record]:
    return [r for r in records if all(r.tags.get(k) == v for k, v in tags.items())]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.inf, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def fmt(v: Any, spec: str = ".4f", std: float | None = None, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if spec == "d":
        return str(int(v))
    return format(scale * v, spec) + ("" if std is None else f" ± {format(scale * std, spec)}")


def figure(path: Path, title: str, xlabel: str, ylabel: str, ncols: int = 1, xlog: bool = False,
           ylog: bool = False):  # fmt: skip
    """A matplotlib figure (Agg backend) with labelled axes; the caller draws and then calls ``save``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols + 0.8, 3.6), squeeze=False)
    for ax in axes[0]:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if xlog:
            ax.set_xscale("log")
        if ylog:
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    return fig, list(axes[0])


def value_ticks(ax, values: list[float]) -> None:
    """Ticks at the grid's own values on a log axis (instead of 10^k labels)."""
    ax.set_xticks(list(values), [format(v, "g") for v in values])
    ax.minorticks_off()


def save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
