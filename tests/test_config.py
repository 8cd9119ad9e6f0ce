"""The "ds_soo" config block: typed parsing, errors that name the dotted field, range validation."""

from __future__ import annotations

import json

import pytest

from ds_soo.config import ConfigError, DampingConfig, PreconditionerConfig, ScheduleConfig


def test_defaults_and_none():
    cfg = PreconditionerConfig.from_dict(None)
    assert cfg == PreconditionerConfig()
    assert cfg.method == "kfac" and cfg.schedule.warm_interval == 10 and cfg.kfac.ema_decay == 0.95


def test_full_block_round_trips_through_json():
    # A block with every key, as it would appear in a ds_config JSON.
    block = json.loads(json.dumps(PreconditionerConfig().to_dict()))
    block["method"] = "shampoo"
    block["schedule"]["warm_steps"] = 50
    block["shampoo"]["max_preconditioner_dim"] = 256
    block["exclude"] = ["lm_head", "*.classifier"]
    cfg = PreconditionerConfig.from_dict(block)
    assert cfg.method == "shampoo" and cfg.schedule.warm_steps == 50
    assert cfg.shampoo.max_preconditioner_dim == 256 and cfg.exclude == ["lm_head", "*.classifier"]
    assert isinstance(cfg.schedule, ScheduleConfig) and isinstance(cfg.damping, DampingConfig)
    assert PreconditionerConfig.from_dict(cfg.to_dict()) == cfg
    assert "fn" not in cfg.to_dict()["damping"]


def test_nested_sections_and_int_to_float():
    cfg = PreconditionerConfig.from_dict({"kfac": {"ema_decay": 0, "fisher": "mc"}, "damping": {"value": 1}})
    assert cfg.kfac.ema_decay == 0.0 and isinstance(cfg.kfac.ema_decay, float)
    assert cfg.kfac.fisher == "mc" and cfg.kfac.pi_damping is True  # untouched defaults kept
    assert cfg.damping.value == 1.0 and isinstance(cfg.damping.value, float)


def test_unknown_key_names_dotted_field_and_accepted_keys():
    with pytest.raises(ConfigError) as e:
        PreconditionerConfig.from_dict({"schedule": {"warm_intervall": 5}})
    msg = str(e.value)
    assert "ds_soo.schedule.warm_intervall" in msg
    assert "warm_interval" in msg and "sparse_interval" in msg and "stagger" in msg
    with pytest.raises(ConfigError) as e:
        PreconditionerConfig.from_dict({"methd": "kfac"})
    assert "ds_soo.methd" in str(e.value) and "'method'" in str(e.value)


def test_prefix_is_used_in_messages():
    with pytest.raises(ConfigError, match=r"^cfg\.ds_soo\.kfac\.bogus"):
        PreconditionerConfig.from_dict({"kfac": {"bogus": 1}}, prefix="cfg.ds_soo")


@pytest.mark.parametrize(
    "block, field, what",
    [
        ({"schedule": {"warm_interval": "10"}}, "ds_soo.schedule.warm_interval", "int"),
        ({"schedule": {"warm_interval": 2.5}}, "ds_soo.schedule.warm_interval", "int"),
        ({"schedule": {"warm_interval": True}}, "ds_soo.schedule.warm_interval", "int"),
        ({"schedule": {"stagger": 1}}, "ds_soo.schedule.stagger", "bool"),
        ({"kfac": {"ema_decay": "0.9"}}, "ds_soo.kfac.ema_decay", "number"),
        ({"schedule": {"warm_steps": "x"}}, "ds_soo.schedule.warm_steps", "int"),
        ({"exclude": "lm_head"}, "ds_soo.exclude", "list"),
        ({"exclude": ["a", 3]}, "ds_soo.exclude[1]", "string"),
        ({"kfac": 3}, "ds_soo.kfac", "mapping"),
        ({"damping": {"fn": 3}}, "ds_soo.damping.fn", "callable"),
    ],
)
def test_wrong_type_names_field(block, field, what):
    with pytest.raises(ConfigError) as e:
        PreconditionerConfig.from_dict(block)
    assert field in str(e.value) and what in str(e.value)


@pytest.mark.parametrize(
    "block, field, accepted",
    [
        ({"method": "adam"}, "ds_soo.method", ["kfac", "shampoo", "psgd", "none"]),
        ({"shampoo": {"grafting": "rmsprop"}}, "ds_soo.shampoo.grafting", ["adam", "sgd", "none"]),
        ({"kfac": {"fisher": "exact"}}, "ds_soo.kfac.fisher", ["empirical", "mc"]),
        ({"damping": {"kind": "linear"}}, "ds_soo.damping.kind", ["constant", "scaled", "callable"]),
        ({"numerics": {"inverse_dtype": "float16"}}, "ds_soo.numerics.inverse_dtype", ["float32", "float64"]),
    ],
)
def test_literal_out_of_set_lists_accepted_values(block, field, accepted):
    with pytest.raises(ConfigError) as e:
        PreconditionerConfig.from_dict(block)
    msg = str(e.value)
    assert field in msg
    for v in accepted:
        assert repr(v) in msg


@pytest.mark.parametrize(
    "block, field",
    [
        ({"schedule": {"warm_interval": 0}}, "ds_soo.schedule.warm_interval"),
        ({"schedule": {"stats_warm_interval": 0}}, "ds_soo.schedule.stats_warm_interval"),
        ({"schedule": {"sparse_interval": -1}}, "ds_soo.schedule.sparse_interval"),
        ({"schedule": {"stats_sparse_interval": 0}}, "ds_soo.schedule.stats_sparse_interval"),
        ({"schedule": {"warm_fraction": 1.5}}, "ds_soo.schedule.warm_fraction"),
        ({"damping": {"value": -1e-3}}, "ds_soo.damping.value"),
        ({"damping": {"kind": "callable"}}, "ds_soo.damping.fn"),
        ({"kfac": {"ema_decay": 1.0}}, "ds_soo.kfac.ema_decay"),
        ({"kfac": {"ema_decay": -0.1}}, "ds_soo.kfac.ema_decay"),
        ({"shampoo": {"max_preconditioner_dim": 0}}, "ds_soo.shampoo.max_preconditioner_dim"),
        ({"psgd": {"max_preconditioner_dim": 0}}, "ds_soo.psgd.max_preconditioner_dim"),
        ({"shampoo": {"beta2": 0.0}}, "ds_soo.shampoo.beta2"),
        ({"shampoo": {"exponent": 3}}, "ds_soo.shampoo.exponent"),
        ({"dist": {"grad_worker_fraction": 0.0}}, "ds_soo.dist.grad_worker_fraction"),
    ],
)
def test_validate_ranges(block, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        PreconditionerConfig.from_dict(block)


def test_boundary_values_accepted():
    cfg = PreconditionerConfig.from_dict(
        {
            "schedule": {"sparse_interval": 0, "warm_fraction": 0.0},
            "kfac": {"ema_decay": 0.0},
            "shampoo": {"beta2": 1.0, "exponent": 2},
            "dist": {"grad_worker_fraction": 1.0},
            "damping": {"value": 0.0},
        }
    )
    assert cfg.schedule.sparse_interval == 0 and cfg.shampoo.exponent == 2


def test_callable_damping_from_python_and_dataclass_passthrough():
    cfg = PreconditionerConfig.from_dict({"damping": {"kind": "callable", "fn": lambda s, b, lr: 0.1}})
    assert cfg.damping.fn(0, 1.0, 1.0) == 0.1
    obj = PreconditionerConfig(method="psgd")
    assert PreconditionerConfig.from_dict(obj) is obj
    obj.kfac.ema_decay = 2.0
    with pytest.raises(ConfigError, match="ema_decay"):
        PreconditionerConfig.from_dict(obj)


def test_readme_reference_lists_every_config_key():
    """The README's ds_config block reference must document every option the dataclasses accept."""
    import dataclasses
    from pathlib import Path

    from ds_soo.config import PreconditionerConfig

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from keys(type(default), prefix + f.name + ".")
            else:
                yield prefix + f.name

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [k for k in keys(PreconditionerConfig) if f"| `{k}` |" not in readme]
    assert not missing, f"README reference lacks {missing}"
