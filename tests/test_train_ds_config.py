"""The trainer and a DeepSpeed JSON agree on one configuration, or the run stops naming the field.

Pure functions, no process group: the rules of ``ds_soo.trainer.ds_config`` (block replaces precond,
optim.name follows its method, batch fields filled or checked, clipping never left to DeepSpeed's
silent default) and the per-micro-batch data split that keeps any world size equal to one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ds_soo.config import ConfigError
from ds_soo.train import main
from ds_soo.trainer import ds_config
from ds_soo.trainer.config import load_config
from ds_soo.trainer.engine import DistInfo, EngineLoop

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny.yaml")


def _cfg(*overrides: str):
    return load_config(TINY, list(overrides))


def test_auto_batch_fields_are_filled_from_the_trainer():
    cfg = _cfg("train.batch_size=64", "train.grad_accum=2")
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}
    out = ds_config.finalize(cfg, ds, world_size=4, precond={"method": "kfac"})
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == (
        64, 8, 2)  # fmt: skip
    assert out["gradient_clipping"] == cfg.optim.grad_clip == 1.0
    assert out["zero_allow_untested_optimizer"] is True  # the trainer's SGD under ZeRO
    assert out["ds_soo"] == {"method": "kfac"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("train_batch_size", 128), ("train_micro_batch_size_per_gpu", 16), ("gradient_accumulation_steps", 4)],
)
def test_disagreeing_batch_field_is_named(field, value):
    cfg = _cfg("train.batch_size=64")
    with pytest.raises(ConfigError, match=field):
        ds_config.finalize(cfg, {field: value}, world_size=2, precond={"method": "none"})


def test_batch_not_divisible_by_world_names_the_option():
    with pytest.raises(ConfigError, match="train.batch_size"):
        ds_config.finalize(_cfg("train.batch_size=64"), {}, world_size=3, precond={"method": "none"})


def test_scheduler_section_is_refused():
    with pytest.raises(ConfigError, match="scheduler"):
        ds_config.finalize(_cfg(), {"scheduler": {"type": "WarmupLR"}}, world_size=1, precond={"method": "none"})


def test_block_replaces_precond_and_sets_the_method():
    ds = {
        "gradient_clipping": 0.0,
        "optimizer": {"type": "SGD", "params": {"lr": 0.2, "momentum": 0.9}},
        "ds_soo": {"method": "shampoo", "damping": {"value": 1e-5}},
    }
    cfg = ds_config.merge_into_trainer(_cfg(), ds)
    assert cfg.optim.name == "shampoo"
    assert cfg.precond == {"damping": {"value": 1e-5}}  # the YAML's precond section is gone
    assert cfg.optim.lr == 0.2 and cfg.optim.grad_clip == 0.0


def test_auto_optimizer_params_take_the_trainer_values():
    cfg = _cfg("optim.lr=0.03")
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": 0.1}}}
    out = ds_config.finalize(cfg, ds, world_size=1, precond={"method": "none"})
    assert out["optimizer"]["params"] == {"lr": 0.03, "betas": [0.9, 0.999], "weight_decay": 0.1}
    assert "zero_allow_untested_optimizer" not in out  # DeepSpeed's own optimizer: its checks apply


def test_block_method_none_turns_preconditioning_off():
    cfg = ds_config.merge_into_trainer(_cfg("optim.base=adamw"), {"ds_soo": {"method": "none"}})
    assert cfg.optim.name == "adamw" and cfg.optim.base is None


def test_bad_block_is_named():
    with pytest.raises(ConfigError, match="precond.damping.vlaue"):
        ds_config.merge_into_trainer(_cfg(), {"ds_soo": {"method": "kfac", "damping": {"vlaue": 1}}})


def test_deepspeed_config_conflicting_with_engine_is_rejected(tmp_path, capsys):
    code = main(["--config", TINY, "--out", str(tmp_path), "--deepspeed_config", "configs/ds/zero2_kfac.json",
                 "train.engine=ddp"])  # fmt: skip
    assert code == 2
    assert "--deepspeed_config implies train.engine=deepspeed" in (tmp_path / "train.log").read_text()


def test_ds_config_needs_the_deepspeed_engine(tmp_path):
    code = main(["--config", TINY, "--out", str(tmp_path), "train.engine=ddp",
                 "train.ds_config=configs/ds/zero2_kfac.json"])  # fmt: skip
    assert code == 2
    assert "train.ds_config is set but train.engine is 'ddp'" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize(("world", "accum"), [(2, 1), (2, 2), (4, 2)])
def test_shard_takes_an_equal_part_of_every_micro_batch(world, accum):
    """Concatenating rank r's k-th micro-batch over ranks gives global micro-batch k, in order."""
    batch = {"x": torch.arange(16), "y": torch.arange(16) * 10}
    micro = 16 // accum
    parts = []
    for rank in range(world):
        engine = EngineLoop.__new__(EngineLoop)  # only shard() is exercised: no model, no process group
        engine.info, engine.grad_accum = DistInfo(rank=rank, world_size=world), accum
        local = engine.shard(batch)
        assert torch.equal(local["y"], local["x"] * 10)
        parts.append(local["x"].chunk(accum))
    for k in range(accum):
        assert torch.equal(torch.cat([p[k] for p in parts]), torch.arange(k * micro, (k + 1) * micro))
