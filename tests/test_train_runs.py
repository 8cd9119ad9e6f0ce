"""Short digits runs through the real CLI: metrics.json is complete, and preconditioning really ran
(a silent fall-back to the base optimizer is the worst bug this project can have)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ds_soo.train import main
from ds_soo.trainer.config import OptimConfig
from ds_soo.trainer.optim import lr_factor

REPO = Path(__file__).resolve().parent.parent
DIGITS = str(REPO / "configs" / "digits_vit.yaml")
STEPS = 3
# A small model and batch keep each run to a couple of seconds; the preconditioner refreshes every step.
SMALL = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "train.batch_size=64",
    "train.epochs=null",
    f"train.steps={STEPS}",
    "train.progress=false",
    "train.num_threads=1",
    "precond.schedule.warm_steps=10",
    "precond.schedule.warm_interval=1",
]
REQUIRED = {
    "config", "train_loss", "final_eval", "step_time_median_s", "wall_time_s", "peak_memory_bytes",
    "param_sq_sum", "preconditioned_steps", "curvature_refreshes", "optimizer_steps", "stats_updates",
    "inverse_failures", "skipped_nonfinite",
}  # fmt: skip


def _run(out: Path, *overrides: str) -> dict:
    assert main(["--config", DIGITS, "--out", str(out), "--quiet", *SMALL, *overrides]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["adamw", "sgd", "kfac", "shampoo", "psgd"])
def test_each_optimizer_writes_complete_metrics(tmp_path, name):
    lr = {"adamw": 1e-3, "sgd": 0.05, "kfac": 0.05, "shampoo": 1e-3, "psgd": 1e-3}[name]
    m = _run(tmp_path, f"optim.name={name}", f"optim.lr={lr}")
    assert REQUIRED <= m.keys()
    assert len(m["train_loss"]) == STEPS == m["steps"]
    assert all(math.isfinite(x) for x in m["train_loss"])
    assert set(m["final_eval"]) == {"loss", "accuracy"} and 0.0 <= m["final_eval"]["accuracy"] <= 1.0
    assert m["step_time_median_s"] > 0 and m["wall_time_s"] > 0 and m["peak_memory_bytes"] > 0
    assert m["param_sq_sum"] > 0 and m["config"]["optim"]["name"] == name
    assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())
    if name in ("adamw", "sgd"):
        assert m["preconditioned_steps"] == m["curvature_refreshes"] == m["optimizer_steps"] == 0
        assert m["config"]["precond"]["method"] == "none"
    else:
        assert m["optimizer_steps"] == STEPS
        assert m["preconditioned_steps"] == STEPS, "every step must be preconditioned in the warm phase"
        assert m["curvature_refreshes"] > 0 and m["inverse_failures"] == 0
        sched = m["config"]["precond"]["schedule"]
        assert sched["total_steps"] == STEPS and sched["steps_per_epoch"] == 1437 // 64
        assert m["config"]["precond"]["damping"]["batch_size"] == 64.0


def test_second_order_on_an_adamw_base(tmp_path):
    m = _run(tmp_path, "optim.name=kfac", "optim.base=adamw", "optim.lr=0.001")
    assert m["config"]["optim"]["base"] == "adamw" and m["preconditioned_steps"] == STEPS
    assert "base adamw" in (tmp_path / "train.log").read_text()


def test_preconditioner_description_is_logged(tmp_path):
    _run(tmp_path, "optim.name=kfac", "optim.lr=0.05")
    log = (tmp_path / "train.log").read_text()
    assert "preconditioner: ds_soo kfac" in log and "preconditioned" in log


@pytest.mark.parametrize("name", ["adamw", "kfac"])
def test_grad_accum_matches_one_big_batch(tmp_path, name):
    """Accumulating 4 micro-batches must give the same training as the full batch at once
    (DeepSpeed's Muon ran its update per micro-batch, #8443: this is the guard against that)."""
    lr = "optim.lr=0.001" if name == "adamw" else "optim.lr=0.05"
    one = _run(tmp_path / "a1", f"optim.name={name}", lr)
    four = _run(tmp_path / "a4", f"optim.name={name}", lr, "train.grad_accum=4")
    assert four["optimizer_steps"] == one["optimizer_steps"]
    assert four["preconditioned_steps"] == one["preconditioned_steps"]
    assert four["param_sq_sum"] == pytest.approx(one["param_sq_sum"], rel=1e-5)
    assert four["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)


def test_same_seed_same_result(tmp_path):
    a = _run(tmp_path / "a", "optim.name=shampoo", "optim.lr=0.001")
    b = _run(tmp_path / "b", "optim.name=shampoo", "optim.lr=0.001")
    assert a["param_sq_sum"] == b["param_sq_sum"] and a["train_loss"] == b["train_loss"]


def test_bf16_eval_interval_and_lr_schedule(tmp_path):
    m = _run(tmp_path, "optim.name=kfac", "optim.lr=0.05", "train.bf16=true", "train.eval_interval=1",
             "optim.warmup_steps=2")  # fmt: skip
    assert [e["step"] for e in m["eval_history"]] == [1, 2, 3]
    assert m["lr"] == pytest.approx([0.025, 0.05, 0.05 * lr_factor(2, STEPS, _optim(warmup_steps=2))])
    assert m["preconditioned_steps"] == STEPS


def test_quality_index_is_logged_when_asked(tmp_path):
    m = _run(tmp_path, "optim.name=kfac", "optim.lr=0.05", "precond.diagnostics.quality_interval=3")
    assert [q["step"] for q in m["quality_index"]] == [3]
    assert math.isfinite(m["quality_index"][0]["quality_index"])


def _optim(**kw) -> OptimConfig:
    return OptimConfig(**kw)


def test_lr_factor_warmup_then_cosine_to_floor():
    cfg = _optim(warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, 20, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, cfg) == pytest.approx(1.0)
    assert lr_factor(20, 20, cfg) == pytest.approx(0.1)
    assert lr_factor(12, 20, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(7, 20, _optim(schedule="constant")) == 1.0
