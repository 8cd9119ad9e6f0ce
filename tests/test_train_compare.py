"""``--compare`` runs each configured method as its own process and tabulates them honestly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ds_soo.config import ConfigError
from ds_soo.experiments.runner import threads_per_job
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


def test_grid_syntax_sweeps_lists_but_not_list_valued_options():
    from ds_soo.trainer.overrides import expand_grid, swept_keys

    grid = expand_grid(["optim.lr=[1e-3,1e-2]", "train.batch_size=[32,64]", "optim.betas=[0.9,0.99]"])
    assert [g[:2] for g in grid] == [
        ["optim.lr=0.001", "train.batch_size=32"],
        ["optim.lr=0.001", "train.batch_size=64"],
        ["optim.lr=0.01", "train.batch_size=32"],
        ["optim.lr=0.01", "train.batch_size=64"],
    ]
    assert all(g[2] == "optim.betas=[0.9,0.99]" for g in grid), "a list-valued option takes a list as one value"
    assert len(expand_grid(["optim.betas=[[0.9,0.99],[0.8,0.9]]"])) == 2, "a list of lists sweeps it"
    assert expand_grid(["precond.schedule.sparse_interval=[10,auto]"]) == [
        ["precond.schedule.sparse_interval=10"], ['precond.schedule.sparse_interval="auto"']]  # fmt: skip
    assert swept_keys(["optim.lr=[1,2]", "train.steps=3", "precond.exclude=[a]"]) == ["optim.lr"]
    with pytest.raises(ConfigError, match="no values"):
        expand_grid(["optim.lr=[]"])


def test_plan_expands_a_grid_per_run():
    runs = plan(DIGITS, ["optim.lr=[0.01,0.1]", "train.batch_size=256"], ["adamw", "kfac"])
    names = [name for name, _, _ in runs]
    assert names == ["adamw@lr=0.01", "adamw@lr=0.1", "kfac@lr=0.01", "kfac@lr=0.1"]
    assert [cfg.optim.lr for _, _, cfg in runs] == [0.01, 0.1, 0.01, 0.1]
    assert all(cfg.train.batch_size == 256 for _, _, cfg in runs)


def test_single_run_with_a_list_value_asks_for_compare(tmp_path, capsys):
    assert main(["--config", DIGITS, "--out", str(tmp_path / "x"), "optim.lr=[0.1,0.2]", *TINY]) == 2
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_compare_jobs_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "cmp"
    args = ["--config", DIGITS, "--compare", "--only", "kfac", "--jobs", "2", "--out", str(out), *TINY,
            "optim.lr=[0.01,0.1]"]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["kfac@lr=0.01", "kfac@lr=0.1"]
    assert [r["lr"] for r in rows] == [0.01, 0.1]
    assert all(r["step_time_mean_s"] is None or r["step_time_mean_s"] > 0 for r in rows)
    assert "step ms mean" in (out / "compare.md").read_text()
    # Two runs at a time share the cores: each gets its half, not all of them (oversubscribed, each ran
    # several times slower).
    share = threads_per_job(2)
    for d in out.glob("*/metrics.json"):
        m = json.loads(d.read_text())
        assert m["num_threads"] == share and m["omp_num_threads"] == str(share), d
    # Interrupted sweep: one run lost its metrics (as if killed). A rerun redoes only that one.
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    (out / "kfac@lr=0.1" / "metrics.json").unlink()
    assert main(args) == 0
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    assert {k for k in after if after[k] != stamps.get(k)} == {"kfac@lr=0.1"}
