"""The trainer rejects bad configs before doing anything: non-zero exit, the field named, only a log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ds_soo.config import ConfigError
from ds_soo.train import main
from ds_soo.trainer.config import load_config
from ds_soo.trainer.overrides import apply_overrides, parse_override

REPO = Path(__file__).resolve().parent.parent
DIGITS = str(REPO / "configs" / "digits_vit.yaml")


def _reject(tmp_path: Path, capsys, *overrides: str, config: str = DIGITS) -> str:
    out = tmp_path / "run"
    code = main(["--config", config, "--out", str(out), *overrides])
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == ["train.log"], "a rejected config must leave only the log"
    log = (out / "train.log").read_text()
    assert "config error" in log
    return log + capsys.readouterr().err


def test_unknown_key_names_the_field(tmp_path, capsys):
    msg = _reject(tmp_path, capsys, "train.bogus=1")
    assert "train.bogus is not a known option" in msg


def test_unknown_section_names_it(tmp_path, capsys):
    assert "optimizer is not a known section" in _reject(tmp_path, capsys, "optimizer.lr=0.1")


def test_wrong_type_names_field_and_value(tmp_path, capsys):
    assert "train.batch_size must be an int, got 'abc'" in _reject(tmp_path, capsys, "train.batch_size=abc")


def test_bad_choice_lists_accepted_values(tmp_path, capsys):
    msg = _reject(tmp_path, capsys, "optim.name=lbfgs")
    assert "optim.name must be one of" in msg and "'kfac'" in msg


def test_precond_typo_is_caught_before_training(tmp_path, capsys):
    msg = _reject(tmp_path, capsys, "optim.name=kfac", "precond.damping.vlaue=0.1")
    assert "precond.damping.vlaue is not a known option" in msg


def test_missing_data_path_names_option_and_env(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DS_SOO_DATA", raising=False)
    msg = _reject(tmp_path, capsys, "data.source=shakespeare", "model.kind=gpt")
    assert "data.path" in msg and "DS_SOO_DATA" in msg


def test_nonexistent_data_path_names_option(tmp_path, capsys):
    msg = _reject(tmp_path, capsys, "data.source=cifar10", f"data.path={tmp_path / 'nowhere'}")
    assert "data.path" in msg and "cifar10_jpeg_q75.npz does not exist" in msg


def test_base_optimizer_only_for_second_order(tmp_path, capsys):
    assert "optim.base applies only to" in _reject(tmp_path, capsys, "optim.name=adamw", "optim.base=sgd")


def test_epochs_and_steps_are_exclusive(tmp_path, capsys):
    assert "exactly one of train.epochs and train.steps" in _reject(tmp_path, capsys, "train.steps=3")


def test_batch_larger_than_dataset_is_rejected(tmp_path, capsys):
    msg = _reject(tmp_path, capsys, "train.batch_size=5000")
    assert "train.batch_size (5000) exceeds" in msg


def test_bad_compare_run_names_the_run(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["--config", DIGITS, "--compare", "--out", str(out), "optim.bogus=1"])
    assert code == 2 and sorted(p.name for p in out.iterdir()) == ["train.log"]
    assert "optim.bogus is not a known option" in (out / "train.log").read_text()


def test_cli_exit_status_is_nonzero(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ds_soo.train", "--config", DIGITS, "--out", str(out), "train.batch_size=abc"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "train.batch_size must be an int, got 'abc'" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["train.log"]


def test_overrides_parse_yaml_values_including_bare_exponents():
    assert parse_override("optim.lr=1e-3") == ("optim.lr", 0.001)
    assert parse_override("optim.betas=[0.9, 0.95]") == ("optim.betas", [0.9, 0.95])
    assert parse_override("train.bf16=true") == ("train.bf16", True)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.lr")
    raw = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=0.5", "precond.damping.value=1e-4"])
    assert raw == {"optim": {"lr": 0.5}, "precond": {"damping": {"value": 1e-4}}}


def test_config_loads_and_method_follows_optim_name():
    cfg = load_config(DIGITS, ["optim.name=shampoo"])
    assert cfg.optim.name == "shampoo" and cfg.train.batch_size == 512
    with pytest.raises(ConfigError, match=r"precond.method \('kfac'\) contradicts optim.name"):
        load_config(DIGITS, ["optim.name=shampoo", "precond.method=kfac"])


@pytest.mark.parametrize("name", ["digits_vit", "tiny", "cifar10_vit", "shakespeare_gpt"])
def test_shipped_configs_validate(name, require_data):
    if name not in ("digits_vit", "tiny"):
        require_data("cifar10_jpeg_q75.npz" if name.startswith("cifar") else "tinyshakespeare.txt")
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    for overrides in cfg.compare.runs.values():
        load_config(REPO / "configs" / f"{name}.yaml", overrides)
