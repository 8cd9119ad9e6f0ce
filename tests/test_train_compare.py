"""``--compare`` runs each configured method as its own process and tabulates them honestly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_soo.train import main
from ds_soo.trainer.compare import _row, markdown, plan

REPO = Path(__file__).resolve().parent.parent
DIGITS = str(REPO / "configs" / "digits_vit.yaml")
TINY = ["model.hidden_size=16", "model.num_layers=1", "train.batch_size=256", "train.epochs=null", "train.steps=2",
        "train.num_threads=1"]  # fmt: skip


def test_plan_applies_run_overrides_then_command_line():
    runs = {name: cfg for name, _, cfg in plan(DIGITS, ["train.batch_size=256"], None)}
    assert {"adamw", "kfac", "shampoo"} <= runs.keys()
    assert all(cfg.train.batch_size == 256 for cfg in runs.values()), "command-line overrides win"
    assert runs["kfac"].optim.name == "kfac" and runs["adamw"].optim.name == "adamw"
    assert len({cfg.optim.lr for cfg in runs.values()}) > 1, "each method carries its own learning rate"
    only = plan(DIGITS, [], ["kfac"])
    assert [name for name, _, _ in only] == ["kfac"]


def _metrics(seed: int, loss: float, acc: float) -> dict:
    return {"config": {"optim": {"name": "kfac", "lr": 0.1}, "train": {"batch_size": 8, "seed": seed},
                       "data": {"seed": seed}},
            "steps": 2, "epochs": 1.0, "final_eval": {"loss": loss, "accuracy": acc}, "train_loss": [1.0, 0.5],
            "step_time_median_s": 0.01, "wall_time_s": 1.0, "preconditioned_steps": 2, "curvature_refreshes": 2,
            "diverged": False}  # fmt: skip


def test_rows_average_over_seeds():
    row = _row("kfac", [_metrics(0, 0.2, 0.9), _metrics(1, 0.4, 0.8)])
    assert row["seeds"] == 2 and row["eval_loss"] == pytest.approx(0.3) and row["eval_accuracy"] == pytest.approx(0.85)
    assert row["eval_loss_std"] == pytest.approx(0.1414, abs=1e-4)
    assert [s["train_seed"] for s in row["per_seed"]] == [0, 1]
    assert "0.3000 ± 0.1414" in markdown([row], "## t") and "85.0 ± 7.1" in markdown([row], "## t")


def test_markdown_reports_failures_and_the_winner():
    ok = _row("a", [_metrics(0, 0.5, 0.9)])
    text = markdown([ok, {"run": "b", "error": "exit 1: boom"}], "## t")
    assert "| b | failed: exit 1: boom |" in text and "Lowest eval loss: **a**" in text
    assert "One seed" in text


def test_compare_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--config", DIGITS, "--compare", "--only", "adamw,kfac", "--out", str(out), *TINY]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["adamw", "kfac"]
    assert rows[0]["preconditioned_steps"] == 0 and rows[1]["preconditioned_steps"] == 2
    table = (out / "compare.md").read_text()
    assert "| kfac | kfac |" in table and table in capsys.readouterr().out
    assert (out / "kfac" / "metrics.json").is_file() and (out / "adamw" / "train.log").is_file()
