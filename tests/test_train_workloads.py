"""The two research workloads end to end on the shared data: char-GPT on Tiny Shakespeare and ViT on
CIFAR-10, each shrunk to a few steps, with a second-order method so the GPT/ViT layer handlers run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ds_soo.train import main

REPO = Path(__file__).resolve().parent.parent
FAST = ["train.epochs=null", "train.steps=2", "train.progress=false", "train.num_threads=1", "train.eval_interval=0",
        "model.hidden_size=32", "model.num_layers=1", "precond.schedule.warm_steps=5"]  # fmt: skip


def _run(out: Path, config: str, *overrides: str) -> dict:
    assert main(["--config", str(REPO / "configs" / config), "--out", str(out), "--quiet", *FAST, *overrides]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["adamw", "kfac", "shampoo"])
def test_shakespeare_gpt(tmp_path, require_data, name):
    require_data("tinyshakespeare.txt")
    m = _run(tmp_path, "shakespeare_gpt.yaml", f"optim.name={name}", "data.block_size=32", "train.batch_size=16",
             "data.eval_windows=32")  # fmt: skip
    assert m["task"] == "lm" and set(m["final_eval"]) == {"loss"}
    assert math.log(65) - 1.0 < m["final_eval"]["loss"] < math.log(65) + 1.0, "about uniform after 2 steps"
    assert m["preconditioned_steps"] == (0 if name == "adamw" else 2)


def test_cifar10_vit(tmp_path, require_data, monkeypatch):
    require_data("cifar10_jpeg_q75.npz")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = _run(tmp_path / "run", "cifar10_vit.yaml", "optim.name=kfac", "optim.lr=0.01", "data.train_size=256",
             "data.eval_size=128", "train.batch_size=128")  # fmt: skip
    assert m["data"]["num_train"] == 256 and 0.0 <= m["final_eval"]["accuracy"] <= 1.0
    assert m["preconditioned_steps"] == 2 and m["curvature_refreshes"] > 0
