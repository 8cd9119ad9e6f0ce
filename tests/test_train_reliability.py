"""The trainer under faults and bad input: nothing a user did or suffered costs them a run.

* a damaged newest checkpoint (truncated, random bytes, empty, deleted file) is skipped with a reason
  and the run resumes from the previous one, bitwise as if nothing happened; none valid is exit 2;
* a checkpoint holding a pickled callable is refused (exit 2) and the callable never runs;
* a run can be extended (a larger train.steps on resume): both schedules follow the new length;
* TensorBoard shows each step once after a resume (purge_step);
* an --out holding a run is refused without touching it, unless resumed or --overwrite;
* divergence by a clear rule (exit 3), library warnings reach train.log;
* a user's first-minute papercuts (grad_clip=null, empty YAML, unknown method, console noise).
Preemption (SIGTERM/SIGINT): tests/test_train_preemption.py. Validation before set-up and data
errors: tests/test_train_validate_first.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_soo.config import ConfigError
from ds_soo.train import main
from ds_soo.trainer import loop, resume

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
STEPS = 6


def cli(out: Path, *overrides: str, config: Path = TINY, flags: tuple[str, ...] = ()) -> int:
    return main(["--config", str(config), "--out", str(out), "--quiet", *flags, *overrides])


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


class Interrupted(Exception):
    """Stands in for the job dying right after a checkpoint was written."""


def _interrupted_run(out: Path, after: int) -> None:
    real_save = resume.save

    def save_then_die(s, h, done, out_dir, log):
        path = real_save(s, h, done, out_dir, log)
        if done == after:
            raise Interrupted(done)
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.resume, "save", save_then_die)
        with pytest.raises(Interrupted):
            cli(out, f"train.steps={STEPS}", "train.checkpoint_every=2", "train.checkpoint_keep=0")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    assert cli(out, f"train.steps={STEPS}") == 0
    return metrics(out)


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A run killed right after its step-4 checkpoint: checkpoints at steps 2 and 4, no metrics.json."""
    out = tmp_path_factory.mktemp("killed") / "run"
    _interrupted_run(out, 4)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_2", "step_4"]
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _random_bytes(p: Path) -> None:
    p.write_bytes(os.urandom(p.stat().st_size))


DAMAGE = {
    "truncated model.pt": ("model.pt", _truncate),
    "random bytes in ds_soo/": ("ds_soo", lambda d: [_random_bytes(f) for f in d.rglob("*") if f.is_file()]),
    "empty trainer.pt": ("trainer.pt", lambda p: p.write_bytes(b"")),
    "deleted optimizer.pt": ("optimizer.pt", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, killed, reference, case):
    out = _copy(killed, tmp_path / "run")
    name, damage = DAMAGE[case]
    damage(out / "checkpoints" / "step_4" / name)
    assert cli(out, f"train.steps={STEPS}", "train.checkpoint_every=2", "train.checkpoint_keep=0",
               "train.resume=true") == 0  # fmt: skip
    m = metrics(out)
    assert m["resumed_from_step"] == 2
    assert m["train_loss"] == reference["train_loss"] and m["param_sq_sum"] == reference["param_sq_sum"]
    log = (out / "train.log").read_text()
    assert "skipping checkpoint step_4" in log and name in log.split("skipping checkpoint step_4")[1].splitlines()[0]


def test_no_valid_checkpoint_exits_2_naming_the_files(tmp_path, killed):
    out = _copy(killed, tmp_path / "run")
    _truncate(out / "checkpoints" / "step_4" / "model.pt")
    (out / "checkpoints" / "step_2" / "trainer.pt").write_bytes(b"")
    assert cli(out, f"train.steps={STEPS}", "train.checkpoint_every=2", "train.resume=true") == 2
    log = (out / "train.log").read_text()
    error = next(line for line in log.splitlines() if "config error" in line)
    assert "no valid checkpoint" in error
    assert str(out / "checkpoints" / "step_4" / "model.pt") in error
    assert str(out / "checkpoints" / "step_2" / "trainer.pt") in error
    assert not (out / "metrics.json").exists()


class _Payload:
    """Unpickling this creates a marker file: what a crafted checkpoint would do on every rank."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _rewrite_manifest(step_dir: Path) -> None:
    """An attacker controls the whole directory, manifest included (when the version has one)."""
    try:
        from ds_soo.trainer import manifest
    except ImportError:
        return
    manifest.write(step_dir, int(step_dir.name.split("_")[1]))


@pytest.mark.parametrize("target", ["trainer.pt", "rng_rank0.pt"])
def test_checkpoint_with_a_pickled_callable_is_refused_and_runs_nothing(tmp_path, killed, target):
    out = _copy(killed, tmp_path / "run")
    marker = tmp_path / "code-ran"
    for step in ("step_2", "step_4"):  # every checkpoint crafted: no fallback can hide the refusal
        d = out / "checkpoints" / step
        state = torch.load(d / target, map_location="cpu", weights_only=False)
        state["payload"] = _Payload(marker)
        with open(d / target, "wb") as f:
            torch.save(state, f)
        _rewrite_manifest(d)
    rc = cli(out, f"train.steps={STEPS}", "train.checkpoint_every=2", "train.resume=true")
    assert not marker.exists(), "loading a checkpoint ran code from it"
    assert rc == 2
    log = (out / "train.log").read_text()
    assert target in log and "cannot be loaded safely" in log
    assert not (out / "metrics.json").exists()


def test_checkpoint_files_load_with_weights_only(killed):
    """Everything the trainer writes itself reads back with weights_only=True (no pickled objects)."""
    d = killed / "checkpoints" / "step_4"
    for name in ("trainer.pt", "rng_rank0.pt", "model.pt", "optimizer.pt"):
        torch.load(d / name, map_location="cpu", weights_only=True)
    from ds_soo.trainer import manifest

    assert manifest.verify(d) is None
    files = json.loads((d / manifest.MANIFEST).read_text())["files"]
    assert {"trainer.pt", "rng_rank0.pt", "model.pt", "optimizer.pt"} <= set(files)


def test_extending_a_run_follows_the_new_length(tmp_path):
    out = tmp_path / "run"
    common = ("optim.schedule=cosine", "train.checkpoint_every=2")
    assert cli(out, "train.steps=4", *common) == 0
    assert cli(out, "train.steps=8", *common, "train.resume=true") == 0
    m = metrics(out)
    assert m["resumed_from_step"] == 2 and m["steps"] == len(m["train_loss"]) == 8
    assert m["config"]["precond"]["schedule"]["total_steps"] == 8
    fresh = tmp_path / "fresh"
    assert cli(fresh, "train.steps=8", *common) == 0
    # From the resume step on, the lr is the 8-step schedule's (not the 4-step one's).
    assert m["lr"][2:] == pytest.approx(metrics(fresh)["lr"][2:], rel=1e-12)
    assert m["lr"][:2] != metrics(fresh)["lr"][:2]
    log = (out / "train.log").read_text()
    assert "follow the new length" in log


def test_tensorboard_has_each_step_once_after_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ds_soo.trainer import report

    out = tmp_path / "run"
    real_add = report.Scalars.add

    def add_then_die(self, values, step):
        real_add(self, values, step)
        if step == 5:  # one step past the step-4 checkpoint, which the resume recomputes
            raise Interrupted(step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report.Scalars, "add", add_then_die)
        with pytest.raises(Interrupted):
            cli(out, f"train.steps={STEPS}", "train.checkpoint_every=4")
    # Readers order event files by name, which starts with the creation second; a real resume is a later
    # process, in this test it is the same one, so let the second change.
    time.sleep(1.1)
    assert cli(out, f"train.steps={STEPS}", "train.checkpoint_every=4", "train.resume=true") == 0
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_output_folder_holding_a_run_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(out, "train.steps=2", "train.checkpoint_every=1") == 0
    before = _snapshot(out)
    assert cli(out, "train.steps=2") == 2  # the same command again
    assert cli(out, "train.steps=2", "optim.lrr=1") == 2  # a config error in a reused folder
    assert _snapshot(out) == before  # metrics, checkpoints, TensorBoard and train.log as they were
    assert "already holds a run" in capsys.readouterr().err
    # Continuing it is allowed; --overwrite starts over.
    assert cli(out, "train.steps=3", "train.resume=true") == 0 and metrics(out)["resumed_from_step"] == 1
    assert cli(out, "train.steps=2", flags=("--overwrite",)) == 0
    assert metrics(out)["resumed_from_step"] is None and not (out / "checkpoints").exists()


def test_config_error_appends_to_an_existing_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("an earlier attempt\n")
    assert cli(out, "optim.lrr=1") == 2
    log = (out / "train.log").read_text()
    assert log.startswith("an earlier attempt\n") and "optim" in log.splitlines()[-1]


def test_divergence_by_growth_stops_and_exits_nonzero(tmp_path):
    out = tmp_path / "run"
    assert cli(out, "optim.name=sgd", "optim.lr=1e6", "train.steps=10") == 3
    m = metrics(out)
    assert m["diverged"] is True and m["steps"] < 10
    assert "divergence_factor" in m["diverged_reason"]
    assert "diverged at step" in (out / "train.log").read_text()
    # The rule can be turned off: the same run then goes on to the end (and still writes finite losses).
    off = tmp_path / "off"
    assert cli(off, "optim.name=sgd", "optim.lr=1e6", "train.steps=4", "train.divergence_factor=0") == 0
    assert metrics(off)["diverged"] is False and metrics(off)["steps"] == 4


def test_healthy_run_is_not_flagged(reference):
    assert reference["diverged"] is False and reference["diverged_reason"] == ""


def test_library_warnings_reach_train_log(tmp_path):
    out = tmp_path / "run"
    # An explicit null total_steps with warm_fraction makes ds_soo.schedule warn at build time.
    assert cli(out, "train.steps=2", "precond.schedule.total_steps=null", "precond.schedule.warm_fraction=0.5",
               "precond.schedule.warm_steps=null") == 0  # fmt: skip
    assert "schedule.total_steps unknown" in (out / "train.log").read_text()


def test_metrics_have_every_step_time_and_the_mean(reference):
    times = reference["step_times_s"]
    assert len(times) == reference["steps"] and all(t > 0 for t in times)
    assert reference["step_time_mean_s"] == pytest.approx(sum(times) / len(times))
    assert reference["interrupted"] is False


def test_grad_clip_null_means_off(tmp_path):
    assert cli(tmp_path / "a", "train.steps=2", "optim.grad_clip=null") == 0
    assert cli(tmp_path / "b", "train.steps=2", "optim.grad_clip=0") == 0
    assert metrics(tmp_path / "a")["train_loss"] == metrics(tmp_path / "b")["train_loss"]


def test_empty_yaml_says_so(tmp_path):
    from ds_soo.trainer.config import load_config

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)


def test_unknown_method_says_it_is_not_a_method():
    from ds_soo.trainer.config import load_config

    with pytest.raises(ConfigError, match=r"'shampo' is not a method.*shampoo"):
        load_config(TINY, ["optim.name=shampoo", "precond.method=shampo"])


def test_parameter_list_goes_to_the_log_and_one_line_to_the_console(tmp_path, capfd):
    out = tmp_path / "run"
    assert main(["--config", str(TINY), "--out", str(out), "train.steps=1", "optim.name=shampoo"]) == 0
    err = capfd.readouterr().err
    log = (out / "train.log").read_text()
    assert log.count("preconditioned  ") >= 8  # the full block list
    assert "preconditioned  " not in err and "base optimizer  " not in err
    assert sum("preconditioner:" in line for line in err.splitlines()) == 1


def test_nothing_to_precondition_warns(tmp_path):
    out = tmp_path / "run"
    assert cli(out, "train.steps=1", "precond.exclude=['*']") == 0
    assert metrics(out)["preconditioned_steps"] == 0 or "0 blocks" in (out / "train.log").read_text()
    assert "no layer ds_soo preconditions" in (out / "train.log").read_text()


def test_trainer_layers_import_one_way():
    """data must not import the trainer; resume must not import the loop."""
    code = (
        "import sys, ds_soo.data, ds_soo.data.npz\n"
        "bad = sorted(m for m in sys.modules if m.startswith('ds_soo.trainer'))\n"
        "assert not bad, bad\n"
        "import ds_soo.trainer.resume\n"
        "assert 'ds_soo.trainer.loop' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_slurm_node_is_sized_by_cpu_affinity_not_omp_threads():
    """tests/infra/slurm_up.sh must size the node as the Slurm tests ask (sched_getaffinity), whatever
    OMP_NUM_THREADS the caller exported; `nproc` honours it and left the test job pending."""
    script = (ROOT / "tests" / "infra" / "slurm_up.sh").read_text()
    line = next(x for x in script.splitlines() if x.startswith("CPUS="))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_THREAD_LIMIT": "1"}
    proc = subprocess.run(["bash", "-c", f'{line}\necho "$CPUS"'], env=env, capture_output=True, text=True, timeout=60)
    assert int(proc.stdout.strip()) == len(os.sched_getaffinity(0))


def test_readme_and_code_agree_on_the_data_directory(monkeypatch):
    """The rule: data.path, else $DS_SOO_DATA, no other default (only the test suite defaults it)."""
    import re

    from ds_soo.trainer.config import DataConfig, resolve_data_path

    monkeypatch.delenv("DS_SOO_DATA", raising=False)
    with pytest.raises(ConfigError, match=r"data\.path.*DS_SOO_DATA.*tinyshakespeare\.txt"):
        resolve_data_path(DataConfig(source="shakespeare"))
    readme = " ".join((ROOT / "README.md").read_text().split())
    sentences = [x for x in re.split(r"(?<=[.;])\s", readme) if "../shared/data" in x]
    assert sentences, "the README should say where the tests look for data"
    for sentence in sentences:
        assert "test suite" in sentence and "configs" not in sentence, sentence


def test_resume_set_in_the_yaml_may_reuse_its_folder(tmp_path):
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    raw["train"].update(resume=True, checkpoint_every=1, steps=2)
    config = tmp_path / "resuming.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert cli(out, config=config) == 0
    assert cli(out, "train.steps=3", config=config) == 0
    assert metrics(out)["resumed_from_step"] == 1 and metrics(out)["steps"] == 3
