"""Resume: an interrupted run continued from its last checkpoint equals the uninterrupted run, bitwise.

* one process, interrupted right after a checkpoint (in this process, no launcher), continued with
  ``train.resume=true``: same per-step losses and final weights, one loss per step, and leftovers
  of an interrupted save are ignored and removed;
* a 2-rank DDP run under torchrun SIGKILLed mid-training (torchrun and both ranks, as a node failure
  would) and relaunched with ``train.resume=true``: no step lost or repeated, same final weights;
* resuming with a different setting is refused, naming the field.
FSDP2 and DeepSpeed resumes: tests/test_trainer_dist.py.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import time

import psutil
import pytest
from test_trainer_dist import ROOT, run_single, run_trainer, trainer_cmd, trainer_env

from ds_soo.config import ConfigError
from ds_soo.train import main
from ds_soo.trainer import loop, resume

STEPS = 6
KILL_AFTER = 10  # the 2-rank run is killed once it has checkpointed step 10 (of 60)


class Interrupted(Exception):
    """Stands in for the job being killed right after a checkpoint was written."""


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    real_save = resume.save

    def save_then_die(s, h, done, out_dir, log):
        path = real_save(s, h, done, out_dir, log)
        if done == step:
            raise Interrupted(done)
        return path

    monkeypatch.setattr(loop.resume, "save", save_then_die)


ADAPTIVE = ("precond.damping.kind=adaptive", "precond.damping.adapt_interval=2", "precond.damping.adapt_decay=0.7")


@pytest.mark.parametrize("damping", [(), ADAPTIVE], ids=["constant", "adaptive"])
def test_single_process_resume_is_bitwise(tmp_path, monkeypatch, damping):
    full = run_single(tmp_path / "full", f"train.steps={STEPS}", *damping)
    out = tmp_path / "run"
    common = (f"train.steps={STEPS}", "train.checkpoint_every=2", "train.checkpoint_keep=0", *damping)
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(Interrupted):
        main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "--quiet", *common])
    monkeypatch.undo()
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_4"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_2", "step_4"]
    assert {"model.pt", "optimizer.pt", "trainer.pt", "rng_rank0.pt", "ds_soo"} <= {
        p.name for p in (ckpts / "step_4").iterdir()
    }
    assert not (out / "metrics.json").exists()
    # What a kill during the next save would leave: a temp dir. It is neither used nor kept.
    (ckpts / ".tmp-step_6").mkdir()
    (ckpts / ".tmp-step_6" / "trainer.pt").write_bytes(b"half written")

    resumed = run_single(out, *common, "train.resume=true")
    assert resumed["resumed_from_step"] == 4
    assert len(resumed["train_loss"]) == resumed["steps"] == STEPS
    assert resumed["optimizer_steps"] == resumed["preconditioned_steps"] == STEPS
    for key in ("train_loss", "lr", "param_sq_sum", "param_fingerprints", "final_eval", "curvature_refreshes",
                "stats_updates", "precond_metrics"):
        assert resumed[key] == full[key], key
    if damping:  # the trainer fed the rule after every second step, and it moved the damping
        assert full["precond_metrics"]["damping_adaptations"] == STEPS // 2
        assert full["precond_metrics"]["damping"] != 1e-2
    assert not (ckpts / ".tmp-step_6").exists()
    log = (out / "train.log").read_text()
    assert "checkpoint: step 4" in log and "resumed from" in log  # the log of the first part is kept


def test_resume_with_other_settings_names_the_field(tmp_path):
    out = tmp_path / "run"
    run_single(out, "train.steps=3", "train.checkpoint_every=2")
    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "--quiet", "train.steps=3",
                 "train.resume=true", "optim.lr=0.1"]) == 2  # fmt: skip
    assert "optim.lr=0.05, this run has 0.1" in (out / "train.log").read_text()


def test_checkpoint_from_before_an_option_resumes_only_with_its_old_behaviour(tmp_path):
    """A checkpoint saved before ``auto_growth``/``pack_statistics`` existed ran with doubling intervals
    and dense statistics: it continues when this run keeps those, and is refused (naming the value)
    when it does not; a field missing for any other reason is still refused."""
    log = logging.getLogger("test")
    now = {"precond": {"method": "kfac", "schedule": {"auto_growth": "doubling", "warm_steps": 5},
                       "shampoo": {"pack_statistics": False}}, "train": {"seed": 0}}  # fmt: skip
    saved = copy.deepcopy(now)
    del saved["precond"]["schedule"]["auto_growth"], saved["precond"]["shampoo"]["pack_statistics"]
    resume.check_compatible(saved, now, tmp_path, log)  # the old behaviour, kept: resumes
    for section, key, value in (("schedule", "auto_growth", "linear"), ("shampoo", "pack_statistics", True)):
        changed = copy.deepcopy(now)
        changed["precond"][section][key] = value
        with pytest.raises(ConfigError, match=f"precond.{section}.{key}=.*before the option existed.*{value!r}"):
            resume.check_compatible(saved, changed, tmp_path, log)
    del saved["precond"]["schedule"]["warm_steps"]
    with pytest.raises(ConfigError, match="precond.schedule.warm_steps=None, this run has 5"):
        resume.check_compatible(saved, now, tmp_path, log)


def test_resume_true_without_checkpoint_starts_fresh(tmp_path):
    m = run_single(tmp_path, "train.steps=2", "train.resume=true")
    assert m["resumed_from_step"] is None and m["steps"] == 2


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks at once; each rank leads its own session, so signal each group."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL) if os.getpgid(p.pid) == p.pid else p.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(procs[1:], timeout=30)


@pytest.mark.dist
def test_killed_ddp_run_resumes_without_lost_or_repeated_steps(tmp_path):
    steps = 60
    common = ("train.engine=ddp", f"train.steps={steps}")
    reference = run_trainer(tmp_path / "uninterrupted", *common)

    out = tmp_path / "killed"
    out.mkdir()
    cmd = trainer_cmd(out, (*common, "train.checkpoint_every=2"))
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=trainer_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    try:
        # Past a few checkpoints, so older ones have been pruned and the newest is not the first.
        while not latest.exists() or int(latest.read_text().strip().split("_")[1]) < KILL_AFTER:
            if proc.poll() is not None:
                raise AssertionError(f"ended before its first checkpoint:\n{(tmp_path / 'killed.log').read_text()}")
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
    assert not (out / "metrics.json").exists(), "the run finished before it was killed; raise `steps`"
    killed_after = int(latest.read_text().strip().split("_")[1])
    print(f"[resume] killed after checkpoint step {killed_after} of {steps}")
    assert KILL_AFTER <= killed_after < steps

    resumed = run_trainer(out, *common, "train.checkpoint_every=2", "train.resume=true")
    assert resumed["resumed_from_step"] >= killed_after
    assert len(resumed["train_loss"]) == resumed["steps"] == steps  # each step counted exactly once
    assert resumed["optimizer_steps"] == resumed["preconditioned_steps"] == steps
    assert resumed["train_loss"] == reference["train_loss"]
    assert resumed["param_sq_sum"] == reference["param_sq_sum"]
    assert resumed["param_fingerprints"] == reference["param_fingerprints"]  # every tensor, bitwise
    assert resumed["curvature_refreshes"] == reference["curvature_refreshes"]
    kept = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert len(kept) == 2 and kept[-1] == steps - 2  # checkpoint_keep=2: the newest two
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
