"""What the launcher tests run, and how a distributed run is compared with a single-process one.

THE SWITCH: every launcher test (netns, Slurm) runs what these three constants say. They name the
real trainer (``python -m ds_soo.train`` on configs/tiny.yaml: a tiny ViT on digits with K-FAC
refreshed every step; DeepSpeed ZeRO-1 with the trainer's optimizer and "auto" batch fields), so the
tests also check that preconditioning ran on every step. The stand-in tests/infra/tiny_worker.py
(``TRAIN_PROGRAM = ["tests/infra/tiny_worker.py"]``, ``TRAIN_CONFIG = None``,
``DS_CONFIG = "tests/infra/ds_zero1.json"``) isolates launcher problems from trainer ones. The launcher appends
``[--config C] train.engine=E [train.ds_config=D] --out DIR`` (ds_soo/integrations/slurm.py:
program_from_env; ENGINE_KEY / DS_CONFIG_KEY rename the keys).
The program must use the same global batch at every world size and write DIR/metrics.json with
``param_sq_sum`` and ``train_loss``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "ds_soo_launch.sh"

TRAIN_PROGRAM: list[str] = ["-m", "ds_soo.train"]
TRAIN_CONFIG: str | None = "configs/tiny.yaml"
DS_CONFIG: str | None = "tests/infra/ds_trainer.json"
RTOL = 1e-5


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Slurm/rendezvous leftovers, with this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "DS_SOO_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env["VIRTUAL_ENV"] = sys.prefix
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def train_env(engine: str, out: Path, procs_per_node: int) -> dict[str, str]:
    """The launcher knobs (ENGINE, PROGRAM, CONFIG, DS_CONFIG, OUT, GPUS_PER_NODE) for one run."""
    env = {
        "ENGINE": engine,
        "PROGRAM": shlex.join(TRAIN_PROGRAM),
        "OUT": str(out),
        "GPUS_PER_NODE": str(procs_per_node),
    }
    if TRAIN_CONFIG:
        env["CONFIG"] = TRAIN_CONFIG
    if engine == "deepspeed" and DS_CONFIG:
        env["DS_CONFIG"] = DS_CONFIG
    return env


_reference_cache: dict[tuple[str, ...], dict] = {}


def run_reference(out: Path, prefix: Sequence[str] = (), timeout: float = 300) -> dict:
    """Single node ("localhost"), single process, through the same launcher; returns metrics.json.

    ``prefix`` runs it elsewhere, e.g. ``ip netns exec NS``. The result depends only on what is
    trained, so it is computed once per pytest process (it costs 5-10 s on two cores).
    """
    key = (*TRAIN_PROGRAM, str(TRAIN_CONFIG))
    if key not in _reference_cache:
        _reference_cache[key] = _run_reference(out, prefix, timeout)
    return _reference_cache[key]


def _run_reference(out: Path, prefix: Sequence[str], timeout: float) -> dict:
    env = clean_env(**train_env("ddp", out, 1), SLURM_JOB_ID="1", SLURM_JOB_NODELIST="localhost",
                    SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0")  # fmt: skip
    proc = subprocess.run([*prefix, "bash", str(LAUNCH)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"reference run failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return load_metrics(out)


def load_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def assert_matches(got: dict, ref: dict, world_size: int) -> None:
    """Same result as the single-process reference, from a run of ``world_size`` ranks."""
    for key in ("param_sq_sum", "train_loss"):
        assert got[key] == pytest.approx(ref[key], rel=RTOL), key
    assert "preconditioned_steps" in got
    if "steps" in got:  # the real trainer: ds_soo preconditioned every step, in both runs
        assert got["preconditioned_steps"] == got["steps"] == ref["steps"] > 0
        assert ref["preconditioned_steps"] == ref["steps"]
    if "params" in ref:  # the stand-in worker also dumps every weight
        assert got["params"] == pytest.approx(ref["params"], rel=RTOL, abs=1e-7)
    if "world_size" in got:
        assert got["world_size"] == world_size
