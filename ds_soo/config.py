"""Dataclass configuration for the preconditioner (the ``"ds_soo"`` block of a ds_config).

Every option is a typed dataclass field. ``PreconditionerConfig.from_dict`` validates a plain dict
(as found in a DeepSpeed JSON or a YAML file) and raises :class:`ConfigError` naming the offending
field and, where the set is closed, the accepted values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range; the message names the field."""


Method = Literal["kfac", "shampoo", "psgd", "none"]


@dataclass
class ScheduleConfig:
    """When curvature statistics are gathered and inverses refreshed: a frequent (warm) phase with
    refreshes every ``warm_interval`` steps, then sparse refreshes every ``sparse_interval`` steps, an
    adaptive interval (``"auto"``) or a frozen preconditioner (0).

    This follows the research's protocol: statistics keep accumulating every ``stats_sparse_interval``
    (10) steps throughout and only the inverse refreshes become rare. The warm phase's length is given
    by exactly one of ``warm_steps``, ``warm_epochs`` (needs ``steps_per_epoch``) or ``warm_fraction``
    (needs ``total_steps``); a length derived from epochs or a fraction spans at least
    ``warm_min_refreshes`` refreshes, and the run logs when that floor applies.
    """

    warm_fraction: float | None = 0.003
    warm_steps: int | None = None
    warm_epochs: float | None = None
    warm_interval: int = 10
    # Floor, in refreshes, on a warm phase given by warm_fraction or warm_epochs (0 = no floor).
    warm_min_refreshes: int = 10
    # 0 freezes the preconditioner after the warm phase; "auto" adapts each block's interval.
    sparse_interval: int | Literal["auto"] = 300
    # Factor statistics may be gathered more often than inverses are recomputed. After the warm phase
    # they accumulate every ``stats_sparse_interval`` steps; None gathers them on refresh steps only.
    stats_warm_interval: int = 1
    stats_sparse_interval: int | None = 10
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    # Spread the blocks' inverse refreshes over the interval so that no step spikes: "sparse" (default)
    # after the warm phase only, where one step would otherwise carry every block's refresh; true in
    # both phases; false never. Blocks are packed into the interval's steps by cost (ds_soo.stagger).
    # The warm phase keeps its refreshes together by default: its interval is short, and equal-shaped
    # blocks due together are refreshed in one batched call.
    stagger: bool | Literal["sparse"] = "sparse"
    # sparse_interval="auto": each block starts at auto_min_interval; after each refresh the relative
    # change of its preconditioned gradient decides: below auto_grow_below the interval grows (up to
    # auto_max_interval), and so does a change within auto_surprise x the block's usual change (below);
    # one that stands out holds the interval, or halves it above auto_shrink_above; auto_freeze_patience
    # refreshes in a row below auto_freeze_below freeze the block. With statistics in an EMA the change
    # never falls to zero (each refresh sees new statistics; early_curvature measured 0.03-0.7 per
    # refresh, with no downward trend), so the freeze threshold equals the growth threshold.
    auto_min_interval: int = 10
    auto_max_interval: int = 1000
    auto_grow_below: float = 0.1
    auto_shrink_above: float = 0.3
    auto_freeze_below: float = 0.1
    auto_freeze_patience: int = 3
    # A change no larger than auto_surprise x the block's usual change (the median of its recent ones)
    # also grows the interval: that much change is the statistics' sampling noise, which refreshing
    # sooner would only track. Above it, the interval holds (halves above auto_shrink_above). None: the
    # absolute thresholds alone, which in early_curvature rarely let an interval grow.
    auto_surprise: float | None = 2.0
    # How an interval grows: "linear" adds auto_min_interval per refresh, so the interval grows like the
    # square root of the steps since the frequent phase and the later refreshes stay spread out;
    # "doubling" doubles it, which spends the sparse phase's refreshes early and then leaves long gaps.
    auto_growth: Literal["linear", "doubling"] = "linear"


@dataclass
class DampingConfig:
    """Damping rho = base * (B/B0)^batch_exponent * (lr/lr0)^lr_exponent for kind="scaled".

    The research found the best damping grows with batch size and learning rate; ``constant``
    ignores both, and a callable ``fn(step, batch_size, lr) -> float`` may be passed from Python.

    ``adaptive`` (K-FAC only) is the Levenberg-Marquardt rule of Martens & Grosse (2015, section 6.5):
    every ``adapt_interval`` steps the loss change of the step, re-measured on the same batch, is
    compared with the change the damped K-FAC quadratic model predicted (the reduction ratio); the
    damping is multiplied by ``adapt_decay ** adapt_interval`` above ``adapt_high`` and divided by it
    below ``adapt_low``, within ``[min_value, max_value]``. ``value`` is the starting point.

    ``relative`` makes the value a fraction of each factor's mean eigenvalue (trace / dim): K-FAC's
    damping of a layer becomes ``value * (tr A / dim A) * (tr G / dim G)`` (split between A and G as
    before), Shampoo's epsilon of each factor ``value * tr L / dim L``; one value then means the same at
    every layer and scale.
    """

    kind: Literal["constant", "scaled", "callable", "adaptive"] = "constant"
    value: float | None = None
    ref_batch_size: float = 128.0
    ref_lr: float = 1e-3
    batch_exponent: float = 0.5
    lr_exponent: float = 0.5
    batch_size: float | None = None
    lr: float | None = None
    fn: Callable[[int, float, float], float] | None = None
    relative: bool = False
    adapt_interval: int = 5
    adapt_decay: float = 0.95
    adapt_low: float = 0.25
    adapt_high: float = 0.75
    min_value: float = 1e-8
    max_value: float = 100.0


@dataclass
class KFACConfig:
    """K-FAC options.

    ``fisher="empirical"`` uses the training loss's own backward (default). ``"mc"`` feeds G from a
    backward of a loss on labels sampled from the model's predictive distribution: the ds_soo trainer
    and ``SecondOrderTrainer`` do this; other loops must call ``Preconditioner.mc_fisher_backward(logits)``
    after each micro-batch's forward, and a statistics step without it raises a ConfigError.

    ``weight_sharing`` sets the factor scale of layers whose weight is applied at several positions
    per example (Conv2d patches, transformer tokens), so that tr(A) tr(G) matches the trace of the
    empirical Fisher of the loss's examples (dim 0 of the layer input is the example dimension):

    - ``"auto"`` (default, per-example losses such as image classification): KFC (Grosse & Martens
      2016), i.e. K-FAC-expand of Eschenhagen et al. 2023 under a per-example loss, for Conv2d and
      token layers alike: A = mean over positions and examples of h h^T, G = mean over examples of
      the sum over positions of (N d)(N d)^T. (Reduce zeroes the G of attention key projections,
      whose per-example gradient sums to zero over tokens, so it is not the default.)
    - ``"expand"`` (Eschenhagen et al. 2023; a loss term per position, e.g. language modelling):
      every row (token, spatial position) is one example; A and G are means over rows.
    - ``"reduce"`` (Eschenhagen et al. 2023): per example, h averaged and d summed over positions.

    ``trace_correction`` (on by default) rescales a KFC layer's G so that tr(A) tr(G) equals the exact
    trace of the empirical Fisher, ``mean_m ||sum_t d_t h_t^T||^2``, computed on statistics steps from
    every example's Gram matrices (see ``ds_soo/curvature/fisher_trace.py``), so the same global batch
    gives the same scale at any world size. ``trace_examples`` limits it to that many examples per
    micro-batch (an estimate that then depends on the local batch). KFC alone assumes positions
    uncorrelated and misses that trace by up to T times where they are not: measured on a ViT on 32 px
    CIFAR-10 (T = 65 tokens), 0.05 for the value and key projections and 0.15 for the patch embedding.
    The structure stays KFC's.

    ``kl_clip`` bounds the step by the KL-clip trust region (Ba et al. 2017; KAISA's ``kl_clip``):
    preconditioned gradients are scaled by ``min(1, sqrt(kl_clip / (lr^2 sum <P g, g>)))``. ``"auto"``
    turns it on (0.001, KAISA's default) when the base optimizer is SGD, off otherwise, and is refused
    where no base optimizer was given (``optimizer=``); null is off.
    """

    ema_decay: float = 0.95
    fisher: Literal["empirical", "mc"] = "empirical"
    pi_damping: bool = True
    # Re-chosen from measurements (docs/results/damping): over batch {32, 128, 512} x lr {0.03, 0.1, 0.3},
    # 1e-2 had the lowest mean eval loss of the constants on digits and beat the old 1e-3 on CIFAR-10 too;
    # at batch 512 the two tie. Adaptive (Levenberg-Marquardt) damping did worse than 1e-2 on both.
    default_damping: float = 1e-2
    weight_sharing: Literal["auto", "expand", "reduce"] = "auto"
    kl_clip: float | Literal["auto"] | None = "auto"
    trace_correction: bool = True
    trace_examples: int | None = None


@dataclass
class ShampooConfig:
    """Shampoo options: L = sum G G^T, R = sum G^T G per block of at most ``max_preconditioner_dim``.

    Blocks come from each parameter with its size-1 dims dropped, viewed as (first dim, rest).
    Tensors of order <= 1 after that (biases, LayerNorm gains, cls tokens) get diagonal (Adagrad-like)
    statistics, as Meta's Distributed Shampoo does: D = sum g*g and the direction
    (D + damping)^(-2/exponent) g, i.e. Adagrad's exponent -1/2 for the default ``exponent`` 4;
    memory O(n), not O(n^2).
    """

    max_preconditioner_dim: int = 1024
    beta2: float = 1.0
    default_damping: float = 1e-6
    grafting: Literal["adam", "sgd", "none"] = "adam"
    graft_beta2: float = 0.999
    graft_epsilon: float = 1e-8
    exponent: int = 4
    # Keep L and R as packed upper triangles (n(n+1)/2 numbers): about half the factor memory, for a
    # gather on statistics steps and a scatter per refresh. The roots stay dense either way.
    pack_statistics: bool = True


@dataclass
class PSGDConfig:
    """PSGD-Kron: Kronecker factors Q fitted iteratively from gradient-whitening pairs.

    Blocked as Shampoo is; a tensor of order <= 1 after dropping size-1 dims gets a diagonal Q (O(n)).
    """

    precond_lr: float = 0.1
    init_scale: float = 1.0
    # Each optimizer step adds this many fitting iterations (gradient-perturbation pairs).
    fit_iterations: int = 1
    max_preconditioner_dim: int = 1024
    default_damping: float = 1e-9
    # Probe vectors come from a per-block generator seeded from (seed, block id, step): independent of
    # the global RNG and of which rank owns the block.
    seed: int = 0


@dataclass
class NumericsConfig:
    """Robustness knobs: roots and inverses run in fp32, retried in fp64, else keep the last good."""

    inverse_dtype: Literal["float32", "float64"] = "float32"
    retry_float64: bool = True
    skip_nonfinite: bool = True
    # Precision of K-FAC's statistics products on CUDA (A, G and the trace correction: O(tokens x d^2)
    # per layer, the bulk of a K-FAC step); always accumulated and stored in fp32. "tf32" is PyTorch's
    # own default for cuDNN convolutions: several times the fp32 rate on Hopper, inputs rounded to 10
    # mantissa bits. "bfloat16" rounds the products to 8 bits, as a factor computed under autocast
    # would be. "float32" is exact fp32. On CPU all three are fp32.
    stats_matmul: Literal["float32", "tf32", "bfloat16"] = "tf32"
    # How Shampoo's inverse roots are computed: "eigh" (one batched eigendecomposition per factor shape)
    # or "newton" (the coupled Newton iteration: matmuls only, fp32; a matrix it does not converge on
    # falls back to eigh). bench/inverse_roots.py measured eigh 7-17x faster on CPU at equal accuracy;
    # newton is for GPUs, where eigh is a slow per-matrix solver call: measure before switching.
    root_method: Literal["eigh", "newton"] = "eigh"


@dataclass
class DistConfig:
    """Distributed placement of curvature blocks."""

    # Fraction of ranks holding each block's inverse (KAISA's grad-worker fraction). None = 1/world.
    grad_worker_fraction: float | None = None
    bucket_mb: float = 25.0
    # "locality": prefer the rank already holding most of a block's gradient (ZeRO-1/2 partitions, FSDP2
    # row shards), as long as the busiest rank stays within locality_slack x LPT's; moves fewer bytes.
    assignment: Literal["lpt", "round_robin", "locality"] = "lpt"
    locality_slack: float = 1.10


@dataclass
class DiagnosticsConfig:
    """Curvature-quality index c(P) with random probes, logged every ``interval`` steps (0 = off)."""

    quality_interval: int = 0
    quality_probes: int = 4


@dataclass
class PreconditionerConfig:
    method: Method = "kfac"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    damping: DampingConfig = field(default_factory=DampingConfig)
    kfac: KFACConfig = field(default_factory=KFACConfig)
    shampoo: ShampooConfig = field(default_factory=ShampooConfig)
    psgd: PSGDConfig = field(default_factory=PSGDConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    # Module names (fnmatch patterns) never preconditioned, e.g. ["lm_head", "*.classifier"].
    exclude: list[str] = field(default_factory=list)
    # Max global norm of the raw averaged gradient, clipped before preconditioning (0 = off), as
    # first-order training clips; clipping the preconditioned direction would shrink a grafted step.
    grad_clip: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | PreconditionerConfig | None, prefix: str = "ds_soo"):
        if data is None:
            return cls()
        if isinstance(data, PreconditionerConfig):
            data.validate()
            return data
        cfg = _build(cls, data, prefix)
        cfg.validate(prefix)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["damping"].pop("fn", None)
        return out

    def _validate_adaptive(self, prefix: str) -> None:
        d = self.damping
        if self.method not in ("kfac", "none"):
            raise ConfigError(
                f"{prefix}.damping.kind='adaptive' needs a curvature model of the loss: it applies to method "
                f"'kfac' only, got method '{self.method}' (accepted kinds here: constant, scaled, callable)"
            )
        _positive(f"{prefix}.damping.adapt_interval", d.adapt_interval)
        if not 0.0 < d.adapt_decay < 1.0:
            raise ConfigError(f"{prefix}.damping.adapt_decay must be in (0, 1), got {d.adapt_decay}")
        if not 0.0 <= d.adapt_low < d.adapt_high:
            raise ConfigError(
                f"{prefix}.damping: need 0 <= adapt_low ({d.adapt_low}) < adapt_high ({d.adapt_high})"
            )
        if not 0.0 < d.min_value <= d.max_value:
            raise ConfigError(
                f"{prefix}.damping: need 0 < min_value ({d.min_value}) <= max_value ({d.max_value})"
            )
        if d.value is not None and not d.min_value <= d.value <= d.max_value:
            raise ConfigError(
                f"{prefix}.damping.value ({d.value}) must lie in [min_value, max_value] = "
                f"[{d.min_value}, {d.max_value}] when damping.kind is 'adaptive'"
            )

    def validate(self, prefix: str = "ds_soo") -> None:
        s = self.schedule
        _positive(f"{prefix}.schedule.warm_interval", s.warm_interval)
        _positive(f"{prefix}.schedule.stats_warm_interval", s.stats_warm_interval)
        if s.sparse_interval != "auto" and s.sparse_interval < 0:
            raise ConfigError(
                f"{prefix}.schedule.sparse_interval must be >= 0 (0 = frozen) or 'auto', got {s.sparse_interval}"
            )
        if s.sparse_interval == "auto" and self.method == "psgd":
            raise ConfigError(
                f"{prefix}.schedule.sparse_interval='auto' applies to kfac and shampoo; psgd fits its preconditioner "
                "on every statistics step (set schedule.stats_sparse_interval instead)"
            )
        if s.sparse_interval == "auto" and s.stats_sparse_interval and s.auto_min_interval % s.stats_sparse_interval:
            # A refresh between two statistics steps would see unchanged factors and count as "no change".
            raise ConfigError(
                f"{prefix}.schedule.auto_min_interval ({s.auto_min_interval}) must be a multiple of "
                f"schedule.stats_sparse_interval ({s.stats_sparse_interval}) when sparse_interval is 'auto'"
            )
        if s.warm_min_refreshes < 0:
            raise ConfigError(f"{prefix}.schedule.warm_min_refreshes must be >= 0, got {s.warm_min_refreshes}")
        _positive(f"{prefix}.schedule.auto_min_interval", s.auto_min_interval)
        _positive(f"{prefix}.schedule.auto_freeze_patience", s.auto_freeze_patience)
        if s.auto_max_interval < s.auto_min_interval:
            raise ConfigError(
                f"{prefix}.schedule.auto_max_interval ({s.auto_max_interval}) must be >= "
                f"schedule.auto_min_interval ({s.auto_min_interval})"
            )
        if not 0.0 <= s.auto_freeze_below <= s.auto_grow_below <= s.auto_shrink_above:
            raise ConfigError(
                f"{prefix}.schedule: need 0 <= auto_freeze_below ({s.auto_freeze_below}) <= auto_grow_below "
                f"({s.auto_grow_below}) <= auto_shrink_above ({s.auto_shrink_above})"
            )
        if s.auto_surprise is not None and not s.auto_surprise >= 1.0:
            raise ConfigError(
                f"{prefix}.schedule.auto_surprise must be >= 1 (a multiple of the block's usual change) or null, "
                f"got {s.auto_surprise}"
            )
        if s.stats_sparse_interval is not None:
            _positive(f"{prefix}.schedule.stats_sparse_interval", s.stats_sparse_interval)
        if s.warm_fraction is not None and not 0.0 <= s.warm_fraction <= 1.0:
            raise ConfigError(f"{prefix}.schedule.warm_fraction must be in [0, 1], got {s.warm_fraction}")
        d = self.damping
        if d.kind == "callable" and d.fn is None:
            raise ConfigError(f"{prefix}.damping.fn must be set when {prefix}.damping.kind is 'callable'")
        if d.value is not None and d.value < 0:
            raise ConfigError(f"{prefix}.damping.value must be >= 0, got {d.value}")
        if d.kind == "adaptive":
            self._validate_adaptive(prefix)
        if d.relative and self.method == "psgd":
            raise ConfigError(
                f"{prefix}.damping.relative applies to methods 'kfac' and 'shampoo' (factors with a trace), "
                "not 'psgd'; set it to false"
            )
        if self.kfac.trace_examples is not None:
            _positive(f"{prefix}.kfac.trace_examples", self.kfac.trace_examples)
        if not 0.0 <= self.kfac.ema_decay < 1.0:
            raise ConfigError(f"{prefix}.kfac.ema_decay must be in [0, 1), got {self.kfac.ema_decay}")
        _positive(f"{prefix}.shampoo.max_preconditioner_dim", self.shampoo.max_preconditioner_dim)
        _positive(f"{prefix}.psgd.max_preconditioner_dim", self.psgd.max_preconditioner_dim)
        if not 0.0 < self.shampoo.beta2 <= 1.0:
            raise ConfigError(f"{prefix}.shampoo.beta2 must be in (0, 1], got {self.shampoo.beta2}")
        if self.shampoo.exponent not in (2, 4):
            raise ConfigError(f"{prefix}.shampoo.exponent must be one of [2, 4], got {self.shampoo.exponent}")
        if self.grad_clip < 0:
            raise ConfigError(f"{prefix}.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        kl = self.kfac.kl_clip
        if isinstance(kl, float) and kl <= 0:
            raise ConfigError(f"{prefix}.kfac.kl_clip must be > 0, 'auto' or null (off), got {kl}")
        if self.dist.locality_slack < 1.0:
            raise ConfigError(f"{prefix}.dist.locality_slack must be >= 1.0, got {self.dist.locality_slack}")
        f = self.dist.grad_worker_fraction
        if f is not None and not 0.0 < f <= 1.0:
            raise ConfigError(f"{prefix}.dist.grad_worker_fraction must be in (0, 1], got {f}")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def _build(cls: type, data: Mapping[str, Any], prefix: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix} must be a mapping of {cls.__name__} fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"{prefix}.{key} is not a known option; accepted keys: {sorted(names)}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}.{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str):
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return _build(hint, value, name)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(opt, value, name)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        accepted = "; or ".join(e.removeprefix(f"{name} ") for e in errors)
        raise ConfigError(f"{name}: {value!r} is not accepted: it {accepted}")
    if origin is Literal:
        allowed = list(get_args(hint))
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {type(value).__name__}")
        (item,) = get_args(hint) or (Any,)
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is Any or origin is typing.Callable or origin is Callable:
        if origin in (typing.Callable, Callable) and not callable(value):
            raise ConfigError(f"{name} must be callable, got {type(value).__name__}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be a bool (true/false), got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an int, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value
