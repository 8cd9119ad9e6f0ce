"""Preemption: SIGTERM (Slurm's warning before it preempts a job) or SIGINT mid-run stops after the
current step, writes a checkpoint and a partial metrics.json marked interrupted, exits 143 / 130 with
no traceback; resumed with train.resume=true the run ends bitwise where an uninterrupted one ends
(every weight and optimizer tensor, every loss)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_soo.train import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 200
EVERY = 10
COMMON = (f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text()):
        assert proc.poll() is None, f"ended before {text!r}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s"
        time.sleep(0.01)


def _tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("model.pt", "optimizer.pt"):
        sd = torch.load(step_dir / name, map_location="cpu", weights_only=True)
        flat = sd if name == "model.pt" else {f"{k}.{j}": v for k, s in sd["state"].items() for j, v in s.items()}
        out.update({f"{name}:{k}": v for k, v in flat.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(["--config", str(TINY), "--out", str(out), "--quiet", *COMMON]) == 0
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_resume_is_bitwise(tmp_path, reference, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ds_soo.train", "--config", str(TINY), "--out", str(out), "--quiet", *COMMON]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "train.log", f"checkpoint: step {EVERY} ", proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"] is True and m["interrupted_by_signal"] == sig
    stopped = m["steps"]
    assert EVERY <= stopped < STEPS and len(m["train_loss"]) == stopped
    assert (out / "checkpoints" / f"step_{stopped}").is_dir(), "no checkpoint at the step it stopped after"
    assert f"stopping after step {stopped}" in (out / "train.log").read_text()

    assert main(["--config", str(TINY), "--out", str(out), "--quiet", *COMMON, "train.resume=true"]) == 0
    got, ref = json.loads((out / "metrics.json").read_text()), json.loads((reference / "metrics.json").read_text())
    assert got["resumed_from_step"] == stopped and got["interrupted"] is False
    assert got["train_loss"] == ref["train_loss"] and got["param_sq_sum"] == ref["param_sq_sum"]
    assert got["final_eval"] == ref["final_eval"]
    last = f"step_{STEPS - EVERY}"
    a, b = _tensors(out / "checkpoints" / last), _tensors(reference / "checkpoints" / last)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.dist
def test_ddp_sigterm_then_resume_past_a_damaged_checkpoint(tmp_path):
    """2 ranks under torchrun: SIGTERM (torchrun passes it to both ranks) stops both at one step with a
    checkpoint, no rank prints a traceback; then that checkpoint is damaged in a file only rank 1 reads
    (rng_rank1.pt), and the 2-rank resume still starts from one step on both ranks (the previous
    checkpoint, chosen by rank 0) and ends bitwise equal to an uninterrupted 2-rank run."""
    from test_trainer_dist import run_trainer, trainer_cmd, trainer_env

    steps, every = 40, 4
    common = ("train.engine=ddp", f"train.steps={steps}", f"train.checkpoint_every={every}", "train.checkpoint_keep=0")
    reference = run_trainer(tmp_path / "uninterrupted", *common)
    out = tmp_path / "run"
    out.mkdir()
    with open(tmp_path / "launch.log", "w") as launch_log:
        proc = subprocess.Popen(trainer_cmd(out, common), cwd=ROOT, env=trainer_env(), stdout=launch_log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        try:
            _wait_for(out / "train.log", f"checkpoint: step {2 * every} ", proc)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    # DDP's stride warning (a one-input-channel conv's weight gradient) is fixed where it arises.
    assert "Grad strides do not match" not in (tmp_path / "launch.log").read_text()
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"] is True and m["world_size"] == 2
    stopped = m["steps"]
    assert 2 * every <= stopped < steps
    for log in out.glob("train*.log"):  # one per rank: each stopped at the same step, none with a traceback
        text = log.read_text()
        assert "Traceback" not in text and f"stopping after step {stopped} " in text, log.name
    newest = out / "checkpoints" / f"step_{stopped}"
    previous = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*") if p != newest)
    rng1 = newest / "rng_rank1.pt"
    rng1.write_bytes(rng1.read_bytes()[:-7])
    resumed = run_trainer(out, *common, "train.resume=true")
    assert resumed["resumed_from_step"] == previous
    assert "skipping checkpoint " + newest.name in (out / "train.log").read_text()
    assert resumed["train_loss"] == reference["train_loss"] and resumed["param_sq_sum"] == reference["param_sq_sum"]
    assert resumed["steps"] == steps and resumed["optimizer_steps"] == steps
