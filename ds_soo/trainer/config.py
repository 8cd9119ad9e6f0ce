"""The trainer's configuration: a YAML file plus ``a.b=value`` overrides, validated into dataclasses.

Validation happens before anything touches the output directory, so a typo costs a message that names
the field rather than a half-written run. Field checking reuses ``ds_soo.config._build`` so that the
trainer and the library report errors the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ds_soo.config import ConfigError, PreconditionerConfig, _build
from ds_soo.data.config import DATA_ENV, DataConfig, DataSource, resolve_data_path  # noqa: F401 - re-exported
from ds_soo.trainer.overrides import apply_overrides, load_raw

FIRST_ORDER = ("adamw", "sgd")
SECOND_ORDER = ("kfac", "shampoo", "psgd")


@dataclass
class ModelConfig:
    """Architecture sizes; the kind (ViT or char-GPT) must match the data's task."""

    kind: Literal["vit", "gpt"] = "vit"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # None = 2 * hidden_size (ViT) or 4 * hidden_size (GPT).
    intermediate_size: int | None = None
    patch_size: int = 2
    dropout: float = 0.0
    # Tied input/output embeddings share one weight between an Embedding and a Linear; off by default
    # so each preconditioned block belongs to exactly one layer.
    tie_embeddings: bool = False


@dataclass
class OptimConfig:
    """The update rule. kfac/shampoo/psgd precondition gradients, then ``base`` applies them."""

    name: Literal["adamw", "sgd", "kfac", "shampoo", "psgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Base optimizer for second-order methods; None = sgd (with ``momentum``).
    base: Literal["adamw", "sgd"] | None = None
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # Max global norm of the (preconditioned) update direction; 0 or null = off.
    grad_clip: float | None = 0.0


@dataclass
class LoopConfig:
    """How long and how: ``batch_size`` is the global batch of one optimizer step, split into
    ``grad_accum`` micro-batches, so changing ``grad_accum`` does not change the optimization."""

    # single | ddp | fsdp2 | deepspeed (ds_soo.trainer.engine.ENGINES). Distributed engines read
    # RANK/WORLD_SIZE/LOCAL_RANK from the launcher (torchrun, deepspeed, Slurm); batch_size stays global.
    engine: str = "single"
    # DeepSpeed JSON for engine=deepspeed (``--deepspeed_config`` sets both). Its "ds_soo" block replaces
    # ``precond``, an "optimizer" section replaces the trainer's optimizer, and its batch fields must
    # agree with batch_size / grad_accum (or be "auto"/absent, then they are filled in).
    ds_config: str | None = None
    # Process-group backend; auto = nccl on CUDA, gloo on CPU.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # DDP only: needed when some parameters get no gradient in a step (a skipped branch).
    find_unused_parameters: bool = False
    batch_size: int = 128
    grad_accum: int = 1
    # Exactly one of epochs / steps sets the length.
    epochs: float | None = None
    steps: int | None = None
    eval_interval: int = 0
    log_interval: int = 1
    device: str = "auto"
    bf16: bool = False
    seed: int = 0
    num_threads: int | None = None
    progress: bool = True
    # Save a resumable checkpoint to OUT/checkpoints/step_K every N optimizer steps (0 = never) and keep
    # the newest ``checkpoint_keep`` of them (0 = all).
    checkpoint_every: int = 0
    checkpoint_keep: int = 2
    # A run whose training loss exceeds this many times its first loss has diverged: it stops, says why
    # in train.log and metrics.json ("diverged": true) and exits 3. A non-finite loss always counts. 0 = off.
    divergence_factor: float = 100.0
    # true: continue from OUT/checkpoints (the newest complete one; start fresh if there is none, so a
    # requeued job can always pass it); a path: that checkpoint (a step_K directory or a checkpoints/ dir).
    resume: bool | str = False


@dataclass
class CompareConfig:
    """``--compare`` runs: name -> overrides (``{"optim.lr": 0.1, ...}``) applied to the base config."""

    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Repeat each run with train.seed and data.seed offset by 0..seeds-1 (new init and data split).
    seeds: int = 1


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    # Handed to PreconditionerConfig.from_dict(prefix="precond"); the trainer fills schedule lengths.
    precond: dict[str, Any] = field(default_factory=dict)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_config(raw: Mapping[str, Any]) -> TrainConfig:
    """Validate a raw dict into a :class:`TrainConfig`; every error names its field."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in sections:
            raise ConfigError(f"{key} is not a known section; accepted: {sorted(sections)}")
        if key == "precond":
            if not isinstance(value, Mapping):
                raise ConfigError(f"precond must be a mapping, got {type(value).__name__}")
            kwargs[key] = dict(value)
        else:
            kwargs[key] = _build(sections[key].default_factory, {} if value is None else value, key)
    cfg = TrainConfig(**kwargs)
    _check(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """YAML file + overrides -> validated config. Raises ConfigError naming the field."""
    return build_config(apply_overrides(load_raw(path), overrides))


def _check(cfg: TrainConfig) -> None:
    t, o, d, m = cfg.train, cfg.optim, cfg.data, cfg.model
    from ds_soo.trainer.engine import ENGINES

    if t.engine not in ENGINES:
        raise ConfigError(f"train.engine must be one of {sorted(ENGINES)}, got {t.engine!r}")
    if t.ds_config is not None:
        if t.engine != "deepspeed":
            raise ConfigError(f"train.ds_config is set but train.engine is {t.engine!r}; use train.engine=deepspeed")
        if not Path(t.ds_config).is_file():
            raise ConfigError(f"train.ds_config: {t.ds_config} does not exist")
    for name, value in [("train.checkpoint_every", t.checkpoint_every), ("train.checkpoint_keep", t.checkpoint_keep)]:
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    if isinstance(t.resume, str) and not Path(t.resume).exists():
        raise ConfigError(f"train.resume: {t.resume} does not exist (use train.resume=true for OUT/checkpoints)")
    for name, value in [
        ("train.batch_size", t.batch_size),
        ("train.grad_accum", t.grad_accum),
        ("train.log_interval", t.log_interval),
        ("model.hidden_size", m.hidden_size),
        ("model.num_layers", m.num_layers),
        ("model.num_heads", m.num_heads),
        ("model.patch_size", m.patch_size),
        ("data.block_size", d.block_size),
        ("data.eval_windows", d.eval_windows),
    ]:
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    if (t.epochs is None) == (t.steps is None):
        raise ConfigError(
            "exactly one of train.epochs and train.steps must be set (null the other, e.g. train.epochs=null)"
        )
    if t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"train.epochs must be > 0, got {t.epochs}")
    if t.steps is not None and t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    if t.divergence_factor < 0:
        raise ConfigError(f"train.divergence_factor must be >= 0 (0 = off), got {t.divergence_factor}")
    if t.eval_interval < 0:
        raise ConfigError(f"train.eval_interval must be >= 0, got {t.eval_interval}")
    if t.num_threads is not None and t.num_threads < 1:
        raise ConfigError(f"train.num_threads must be >= 1, got {t.num_threads}")
    if t.device not in ("auto", "cpu") and not t.device.startswith("cuda"):
        raise ConfigError(f"train.device must be 'auto', 'cpu' or 'cuda[:N]', got {t.device!r}")
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if o.grad_clip is None:
        o.grad_clip = 0.0  # null and 0 both mean "no clipping"; the engines read a number
    if o.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip must be >= 0 (0 or null = off), got {o.grad_clip}")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must have two entries, got {o.betas}")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if o.base is not None and o.name in FIRST_ORDER:
        raise ConfigError(f"optim.base applies only to {list(SECOND_ORDER)}, not optim.name={o.name!r}")
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
    for name in ("train_size", "eval_size"):
        value = getattr(d, name)
        if value is not None and value < 1:
            raise ConfigError(f"data.{name} must be >= 1, got {value}")
    _check_precond(cfg)
    _check_compare(cfg)
    resolve_data_path(d)


def _check_precond(cfg: TrainConfig) -> None:
    """Validate the precond block now (unknown keys, types) so a typo fails before training starts."""
    method = cfg.precond.get("method")
    if method is not None and method not in (*SECOND_ORDER, "none"):
        raise ConfigError(f"precond.method: {method!r} is not a method; accepted: {[*SECOND_ORDER, 'none']}")
    if cfg.optim.name in SECOND_ORDER and method is not None and method != cfg.optim.name:
        raise ConfigError(f"precond.method ({method!r}) contradicts optim.name ({cfg.optim.name!r}); drop one")
    PreconditionerConfig.from_dict(precond_dict(cfg), prefix="precond")


def precond_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The precond block with ``method`` set from ``optim.name`` (a copy; the config is not changed)."""
    d = copy.deepcopy(cfg.precond)
    d["method"] = cfg.optim.name if cfg.optim.name in SECOND_ORDER else "none"
    return d


def _check_compare(cfg: TrainConfig) -> None:
    if not isinstance(cfg.compare.runs, dict):
        raise ConfigError(f"compare.runs must map run names to overrides, got {type(cfg.compare.runs).__name__}")
    for name, overrides in cfg.compare.runs.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"compare.runs.{name} must map option names to values, got {overrides!r}")
        for key in overrides:
            if not isinstance(key, str) or key.startswith("compare"):
                raise ConfigError(f"compare.runs.{name}: {key!r} is not an overridable option")
