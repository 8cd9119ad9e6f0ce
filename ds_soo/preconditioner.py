"""The gradient preconditioner that runs between the last backward of an optimizer step and the step.

``loss.backward(); pre.step(); optimizer.step()`` with any torch optimizer: ``step()`` rewrites the
gradients in place and the optimizer (or the engine's own optimizer) applies the update. The same
code runs in one process and distributed: an engine adapter (``GradientAccess``) says where each
rank's piece of every averaged gradient lives, and an ``Exchange`` moves statistics and gradient
blocks to their owner rank and the results back. With one process both are trivial.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ds_soo import batched
from ds_soo.adaptive_damping import AdaptiveDamping
from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.curvature import batched_refresh
from ds_soo.curvature.fisher_trace import sum_sq_norms, trace_corrected
from ds_soo.curvature.kfac import KFACBlock
from ds_soo.curvature.levenberg_marquardt import LevenbergMarquardt
from ds_soo.curvature.precision import as_state, gram, stats_precision
from ds_soo.curvature.psgd import PSGDKronBlock
from ds_soo.curvature.shampoo import ShampooBlock
from ds_soo.distributed.assignment import BlockCost, assign_blocks, assign_blocks_local, held_elements
from ds_soo.distributed.exchange import BlockIndex, Exchange, LocalExchange, full_range
from ds_soo.distributed.layout import GradientAccess, LocalGradientAccess
from ds_soo.effective import (
    EffectiveOptions,
    check_config_lr,
    describe_damping,
    innermost_optimizer,
    method_default_damping,
    needs_lr,
    optimizer_lr,
    resolve_kl_clip,
)
from ds_soo.layers.handlers import LayerHandler, find_kfac_layers
from ds_soo.schedule import CurvatureSchedule, damping_value

log = logging.getLogger(__name__)

COUNTER_NAMES = (
    "optimizer_steps",
    "preconditioned_steps",
    "curvature_refreshes",
    "stats_updates",
    "inverse_failures",
    "skipped_nonfinite",
    # K-FAC blocks whose weight got a gradient although the layer's forward hook never ran (a parent
    # used the weight functionally): that step their gradient goes to the base optimizer as is.
    "uncaptured_passthrough",
    "clipped_steps",
)


@dataclass
class MatrixBlock:
    """A preconditioned unit: its gradient vector's pieces and the map from vector to matrix."""

    block_id: str
    pieces: list[tuple[str, torch.Tensor]]
    rows: int
    cols: int
    layer: LayerHandler | None = None
    # Shampoo or PSGD on an order-1 tensor (after dropping size-1 dims): diagonal, O(n) memory.
    diagonal: bool = False

    def to_matrix(self, vec: torch.Tensor) -> torch.Tensor:
        return self.layer.to_matrix(vec) if self.layer else vec.view(self.rows, self.cols)

    def from_matrix(self, mat: torch.Tensor) -> torch.Tensor:
        return self.layer.from_matrix(mat) if self.layer else mat.reshape(-1)

    @property
    def dims(self) -> list[int]:
        return [self.rows, self.cols]

    def cost(self) -> BlockCost:
        """Cost-model entry for the owner assignment: a diagonal block costs O(n), not O(n^3)."""
        if self.diagonal:
            return BlockCost((1,), float(self.rows))
        return BlockCost((self.rows, self.cols))


def _tile_blocks(name: str, shape: tuple[int, ...], max_dim: int, diagonal_1d: bool = False) -> list[MatrixBlock]:
    """Shampoo/PSGD blocks of a parameter: size-1 dims dropped, then viewed as (first dim, rest), tiled to max_dim.

    Dropping size-1 dims keeps the flat element order, so the blocks' flat indices stay valid, and a
    (1, T, d) position embedding is one T x d matrix rather than 1 x T*d (whose right factor would be
    T*d wide, in T*d/max_dim tiles). With ``diagonal_1d`` a tensor of order <= 1 after that (a bias, a
    (1, 1, d) cls token) is one diagonal block: its statistics are O(n) anyway.
    """
    dims = [d for d in shape if d != 1]
    numel = math.prod(dims)
    if diagonal_1d and len(dims) <= 1:
        return [MatrixBlock(name, [(name, full_range(numel))], numel, 1, diagonal=True)]
    rows = dims[0] if dims else 1
    cols = math.prod(dims[1:])
    # Column tiles are strided 2-D views of the shared range (no copy): no index memory of their own.
    flat = full_range(rows * cols).view(rows, cols) if cols > max_dim else None
    blocks = []
    for r0 in range(0, rows, max_dim):
        for c0 in range(0, cols, max_dim):
            r1, c1 = min(r0 + max_dim, rows), min(c0 + max_dim, cols)
            single = r0 == 0 and c0 == 0 and r1 == rows and c1 == cols
            bid = name if single else f"{name}[{r0}:{r1},{c0}:{c1}]"
            if c0 == 0 and c1 == cols:  # a band of whole rows (the whole tensor included): consecutive
                idx = full_range(r1 * cols, r0 * cols)
            else:
                idx = flat[r0:r1, c0:c1]
            blocks.append(MatrixBlock(bid, [(name, idx)], r1 - r0, c1 - c0))
    return blocks


class _HostReads:
    """The device-side decisions of one step, read back to the host together: one synchronisation.

    ``add`` takes a 0-d tensor (or a value already on the host) and returns its slot; ``read`` copies
    every pending tensor at once. ``undo`` holds (slot, action): the action runs if the slot reads false
    (a state created under a pending decision that turned out false is put back).
    """

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._values: list[Any] = []
        self.undo: list[tuple[int, Any]] = []

    def add(self, value: Any) -> int:
        self._items.append(value)
        return len(self._items) - 1

    def read(self) -> None:
        tensors = [(i, v) for i, v in enumerate(self._items) if isinstance(v, torch.Tensor)]
        values = list(self._items)
        if tensors:
            device = tensors[0][1].device
            host = torch.cat([v.reshape(-1).to(device, torch.float64) for _, v in tensors]).tolist()
            pos = 0
            for i, v in tensors:
                n = v.numel()
                vals = [bool(h) for h in host[pos : pos + n]] if v.dtype == torch.bool else host[pos : pos + n]
                values[i] = vals[0] if v.dim() == 0 else vals
                pos += n
        self._values = values

    def __getitem__(self, slot: int | tuple[int, int]) -> Any:
        if isinstance(slot, tuple):
            return self._values[slot[0]][slot[1]]
        return self._values[slot]


@dataclass
class _BlockOutcome:
    """What a step's blocks leave to settle on the host after the read."""

    blocks: list[tuple[str, int, int | None]] = field(default_factory=list)  # (block, ok slot, active slot)
    uncaptured: list[tuple[str, int]] = field(default_factory=list)  # (K-FAC block, nonzero slot)
    groups: list[tuple[list[str], int, int]] = field(default_factory=list)  # batched: (blocks, ok, active)
    i_nu: int | None = None


def _forget_stats(state: ShampooBlock) -> None:
    state.left = state.right = None


class Preconditioner:
    """K-FAC, Shampoo or PSGD-Kron preconditioning of a model's gradients at the step boundary."""

    def __init__(
        self,
        model: nn.Module,
        config: PreconditionerConfig | dict[str, Any] | None = None,
        *,
        access: GradientAccess | None = None,
        exchange: Exchange | None = None,
        optimizer: Any = None,
    ):
        """``optimizer`` is the optimizer that applies the preconditioned gradients: ``kfac.kl_clip: auto``
        resolves from its type, and the damping rule and KL-clip read the lr from its param groups on
        every step. Without it (and without a later ``set_base_optimizer``) ``auto`` is refused.
        """
        self.cfg = PreconditionerConfig.from_dict(config)
        self.model = model
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # Curvature state and the blocks sent between ranks follow the model: float64 for a float64 model.
        self.state_dtype = torch.float64 if any(p.dtype == torch.float64 for p in named.values()) else torch.float32
        self.access = access if access is not None else LocalGradientAccess(named)
        self.exchange = exchange if exchange is not None else self._default_exchange()
        self.rank, self.world_size = self.access.rank, self.access.world_size
        self.layouts = self.access.param_layouts()
        self.schedule = CurvatureSchedule(self.cfg.schedule)
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.block_refreshes: dict[str, int] = {}
        self.block_preconditioned: dict[str, int] = {}
        self.last_refresh_step: int | None = None
        self.last_damping: float = 0.0
        self.last_step_skipped = False
        self.last_grad_norm: float | None = None
        self.last_kl_scale: float | None = None
        self.base_optimizer: Any = None  # the optimizer whose param groups give the lr
        self._config_lr = self.cfg.damping.lr  # the config's own damping.lr (set_hyperparams may change cfg's)
        self._effective: EffectiveOptions | None = None  # the options last logged
        self._warned_uncaptured: set[str] = set()
        # damping.kind="adaptive": the Levenberg-Marquardt state, fed by damping_feedback().
        self.adaptive: AdaptiveDamping | None = None
        if self.cfg.damping.kind == "adaptive" and self.cfg.method == "kfac":
            start = damping_value(self.cfg.damping, method_default_damping(self.cfg), 0)
            self.adaptive = AdaptiveDamping(LevenbergMarquardt.from_config(self.cfg.damping, start))
        self._capture_paused = False

        shapes = {n: tuple(lay.shape) for n, lay in self.layouts.items()}
        # The shared index range grown once, up front: every block's index is then a view of one range
        # (growing it parameter by parameter would keep each smaller generation alive through its views).
        full_range(max((math.prod(s) for s in shapes.values()), default=0))
        self.blocks, self.fall_through = self._build_blocks(shapes)
        self.block_index: BlockIndex = {b.block_id: b.pieces for b in self.blocks}
        self.owner_of = self._assign()
        # PSGD fits every block on its statistics steps: there is no per-block refresh to spread.
        per_block = self.cfg.method in ("kfac", "shampoo")
        self.schedule.plan_stagger({b.block_id: b.cost().compute for b in self.blocks} if per_block else None)
        self.replicated = self._replication_mode()
        if self.replicated and self.schedule.auto is not None:
            # Each owner adapts its blocks' intervals from its own measurements; replicas could not follow.
            raise ConfigError("schedule.sparse_interval='auto' needs dist.grad_worker_fraction unset (owner-only)")
        # Owners keep statistics and compute inverses; with replication every rank keeps every inverse.
        self.states: dict[str, Any] = {
            b.block_id: self._new_state(b)
            for b in self.blocks
            if self.replicated or self.owner_of[b.block_id] == self.rank
        }
        self._stats_now = self.schedule.stats_due(0)
        self._eager = True  # whether the current step decides on the host as it goes (see step())
        self._groups: dict[tuple, batched.Group] = {}  # batched equal-shaped blocks, kept for their stacks
        # One process: equal-shaped blocks go through batched ops (False: block by block, the same math).
        self.batch_equal_blocks = True
        self._mc_capture = False
        self._mc_seen = False
        self._mc_outputs: list[torch.Tensor] = []
        self._acc: dict[str, dict[str, Any]] = {}
        self._fwd_ran: set[str] = set()
        self._got_grad: set[str] = set()
        self._hooks = self._register_hooks() if self.cfg.method == "kfac" else []
        self._hooks += self._register_grad_hooks()
        self._precond_param_ids = {id(named[n]) for b in self.blocks for n, _ in b.pieces if n in named}
        if optimizer is not None:
            self.set_base_optimizer(optimizer)
        log.info(self.describe())

    @classmethod
    def for_engine(
        cls,
        wrapped: Any,
        config: PreconditionerConfig | dict[str, Any] | None = None,
        optimizer: Any = None,
        **access_kwargs: Any,
    ) -> Preconditioner:
        """A preconditioner for a DDP-wrapped, FSDP2-sharded or DeepSpeed-engine model (or a plain one).

        Hooks go on the inner module; the engine adapter says where each rank's gradient shards live.
        ``optimizer`` is the base optimizer (a DeepSpeed engine's own by default; see ``__init__``).
        ``access_kwargs`` go to the adapter, e.g. ``scaler=`` a ``torch.amp.GradScaler`` under DDP.
        """
        from ds_soo.distributed.engines import access_for

        if optimizer is None:  # a DeepSpeed engine carries its optimizer
            optimizer = getattr(wrapped, "basic_optimizer", None)
        inner = getattr(wrapped, "module", wrapped)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return cls(inner, config, optimizer=optimizer)
        return cls(inner, config, access=access_for(wrapped, **access_kwargs), optimizer=optimizer)

    # ----------------------------------------------------------------- construction
    def _default_exchange(self) -> Exchange:
        if self.access.world_size == 1:
            return LocalExchange(self.access)
        from ds_soo.distributed.collective import CollectiveExchange

        return CollectiveExchange(self.access, bucket_mb=self.cfg.dist.bucket_mb, dtype=self.state_dtype)

    def _build_blocks(self, shapes: dict[str, tuple[int, ...]]) -> tuple[list[MatrixBlock], dict[str, str]]:
        method = self.cfg.method
        if method == "none":
            return [], {n: "method is 'none'" for n in shapes}
        if method == "kfac":
            layers, reasons = find_kfac_layers(self.model, shapes, self.cfg.exclude)
            return [MatrixBlock(lay.name, lay.pieces(), lay.out_dim, lay.in_dim, lay) for lay in layers], reasons
        sub = self.cfg.shampoo if method == "shampoo" else self.cfg.psgd
        max_dim = sub.max_preconditioner_dim
        blocks, reasons = [], {}
        for name, shape in shapes.items():
            if any(fnmatch.fnmatch(name, pat) for pat in self.cfg.exclude):
                reasons[name] = "excluded by pattern"
                continue
            blocks.extend(_tile_blocks(name, shape, max_dim, diagonal_1d=True))
        return blocks, reasons

    def _assign(self) -> dict[str, int]:
        if self.world_size == 1:
            return {b.block_id: 0 for b in self.blocks}
        costs = {b.block_id: b.cost() for b in self.blocks}
        dist_cfg = self.cfg.dist
        if dist_cfg.assignment == "locality":
            held = held_elements(self.block_index, self.layouts, self.world_size)
            self.assignment = assign_blocks_local(costs, held, self.world_size, slack=dist_cfg.locality_slack)
        else:
            self.assignment = assign_blocks(costs, self.world_size, strategy=dist_cfg.assignment)
        return dict(self.assignment.owner)

    def _replication_mode(self) -> bool:
        """``dist.grad_worker_fraction``: None (or 1/world) keeps each inverse on its owner only; 1.0
        replicates every inverse on every rank, which (when every rank holds the full averaged
        gradient, as under DDP and ZeRO-0) lets each rank precondition its own gradient with no
        gradient exchange at all: only refreshed inverses are broadcast. Preconditioning is linear and
        the inverses are identical everywhere, so this equals preconditioning before the reduction."""
        fraction = self.cfg.dist.grad_worker_fraction
        if fraction is None or self.world_size == 1 or fraction * self.world_size <= 1:
            return False
        if fraction != 1.0:
            raise ConfigError(
                f"dist.grad_worker_fraction must be 1/world_size (= {1 / self.world_size:g}, the default: each "
                f"inverse on its owner only) or 1.0 (every rank holds every inverse), got {fraction}"
            )
        for name, lay in self.layouts.items():
            if any(held != (0, lay.numel) for held in lay.held):
                raise ConfigError(
                    "dist.grad_worker_fraction=1.0 needs every rank to hold the full gradient (DDP or ZeRO-0); "
                    f"parameter {name} is sharded by this engine, so use the default owner-only placement"
                )
        self._local_exchange = LocalExchange(self.access)
        return True

    def _new_state(self, block: MatrixBlock):
        c = self.cfg
        if c.method == "kfac":
            return KFACBlock(block.cols, block.rows, c.kfac.ema_decay, c.kfac.pi_damping, c.damping.relative)
        if c.method == "shampoo":
            s = c.shampoo
            return ShampooBlock(
                block.rows, block.cols, s.beta2, s.exponent, s.grafting, s.graft_beta2, s.graft_epsilon,
                diagonal=block.diagonal, root_method=c.numerics.root_method, packed=s.pack_statistics,
                relative_damping=c.damping.relative,
            )
        return PSGDKronBlock(block.rows, block.cols, c.psgd.precond_lr, c.psgd.init_scale, diagonal=block.diagonal)

    # ----------------------------------------------------------------- K-FAC capture
    def _register_hooks(self) -> list:
        handles = []
        for block in self.blocks:
            handles.append(block.layer.module.register_forward_hook(self._make_forward_hook(block.layer)))
        return handles

    def _register_grad_hooks(self) -> list:
        """Record which parameters autograd produced a gradient for this step (functional use included).

        DeepSpeed ZeRO-3 (0.19) keeps the previous step's gradient partition for a parameter that got
        no gradient this step and applies it again, so under it (``access.stale_unused_grads``) a
        parameter that got no gradient on any rank has its held gradient zeroed in ``step()``. Whether
        a parameter is used is decided from autograd's own gradient, never from module forward hooks:
        a parent module may apply a child's weight functionally (``nn.MultiheadAttention.out_proj``).
        """
        if not getattr(self.access, "stale_unused_grads", False):
            return []
        canonical = {n: p for n, p in self.model.named_parameters()}
        handles = []
        for name in self.layouts:
            p = canonical.get(name)
            if p is not None and p.requires_grad:
                handles.append(p.register_hook(self._make_param_hook(name)))
        return handles

    def _make_param_hook(self, name: str):
        def hook(grad):
            self._got_grad.add(name)

        return hook

    def _zero_stale(self) -> None:
        """ZeRO-3: zero the held gradient of every parameter that got no gradient on any rank (one all_reduce)."""
        names = list(self.layouts)
        used = self.exchange.any_true_many([n in self._got_grad for n in names])
        for name, u in zip(names, used, strict=True):
            if not u:
                g = self.access.local_grad(name)
                if g is not None:
                    g.zero_()

    def _capturing(self, module: nn.Module) -> bool:
        return self._stats_now and module.training and torch.is_grad_enabled()

    @contextlib.contextmanager
    def paused_capture(self) -> Iterator[None]:
        """Forward and backward passes inside this context feed no statistics (a re-evaluation of the
        loss for ``damping_feedback``, an evaluation in train mode)."""
        before, self._capture_paused = self._capture_paused, True
        try:
            yield
        finally:
            self._capture_paused = before

    def _make_forward_hook(self, layer: LayerHandler):
        def forward_hook(module, inputs, output):
            if self._capture_paused:
                return
            if module.training and torch.is_grad_enabled():
                self._fwd_ran.add(layer.name)
            if not self._capturing(module):
                return
            acc = self._acc.setdefault(layer.name, {"a": None, "a_rows": 0, "g": None, "g_rows": 0})
            mode = layer.sharing(self.cfg.kfac.weight_sharing, inputs[0].dim())
            rows, count = layer.a_stats(inputs[0], mode)
            with torch.autocast(rows.device.type, enabled=False):  # fp32 statistics even under autocast
                aa = gram(rows, self.cfg.numerics.stats_matmul)
            acc["a"] = aa if acc["a"] is None else acc["a"] + aa
            acc["a_rows"] += count
            if isinstance(output, torch.Tensor) and output.requires_grad:
                # KFC's trace correction re-reads the input in the backward: a reference, not a copy
                # (autograd keeps the same tensor for the weight gradient).
                kept = inputs[0].detach() if mode == "kfc" and self.cfg.kfac.trace_correction else None
                output.register_hook(self._make_grad_hook(layer, mode, kept))
                if self.cfg.kfac.fisher == "mc":
                    self._mc_outputs.append(output)

        return forward_hook

    def _make_grad_hook(self, layer: LayerHandler, mode: str, kept_input: torch.Tensor | None = None):
        def grad_hook(grad):
            if self.cfg.kfac.fisher == "mc" and not self._mc_capture:
                return
            acc = self._acc[layer.name]
            rows, examples = layer.g_stats(grad, mode)
            scale = 1.0 if self._mc_capture else self.access.grad_scale()
            if scale != 1.0:
                rows = rows / scale  # d of the training loss carries the fp16 loss scale; G must not (S^2)
            precision = self.cfg.numerics.stats_matmul
            with torch.autocast(rows.device.type, enabled=False), stats_precision(precision, rows.device):
                gg = gram(rows, precision)
                if kept_input is not None:  # the exact per-example trace, for KFC's scale (see _trace_corrected)
                    sq, used = sum_sq_norms(
                        lambda a, b: layer.input_rows(kept_input[a:b]), layer.in_dim, rows, examples,
                        self.cfg.kfac.trace_examples,
                    )
                    acc["f"] = sq if acc.get("f") is None else acc["f"] + sq
                    acc["f_n"] = acc.get("f_n", 0) + used
            acc["g"] = gg if acc["g"] is None else acc["g"] + gg
            acc["g_rows"] += examples

        return grad_hook

    @contextlib.contextmanager
    def capturing_mc(self) -> Iterator[None]:
        """Backward passes inside this context feed G when ``kfac.fisher == "mc"``."""
        self._mc_capture = True
        try:
            yield
        finally:
            self._mc_capture = False

    def mc_fisher_backward(
        self, logits: torch.Tensor, generator: torch.Generator | None = None, loss_scale: float = 1.0
    ) -> None:
        """Sample targets from the model's softmax and backprop their loss into G only (no .grad).

        Call it after each micro-batch's forward, before that micro-batch's backward, with
        ``loss_scale`` the factor the training loss gets (``1 / grad_accum`` under gradient
        accumulation), so that G has the training loss's scale. The backward reaches only the K-FAC
        layers' outputs: no parameter gradient is computed, so no engine reduction hook runs.
        """
        if self.cfg.method != "kfac" or self.cfg.kfac.fisher != "mc":
            return
        if not getattr(self.access, "mc_backward_safe", True):
            raise ConfigError(
                f"ds_soo.kfac.fisher 'mc' is not supported under {type(self.access).__name__} (FSDP2 and ZeRO-3 run "
                "their own hooks in every backward); use kfac.fisher: empirical, or DDP / ZeRO-0/1/2"
            )
        outputs, self._mc_outputs = self._mc_outputs, []
        if not self._stats_now or not logits.requires_grad or not outputs:
            return
        flat = as_state(logits.reshape(-1, logits.shape[-1]))
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(flat, dim=-1), 1, generator=generator).squeeze(1)
        loss = nn.functional.cross_entropy(flat, sampled) * loss_scale
        with self.capturing_mc():
            torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        self._mc_seen = True

    def _reduced_factors(
        self, skip: set[str] = frozenset()
    ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Sum this step's local factor statistics over ranks, to each layer's owner only."""
        if self.world_size == 1:  # nothing to reduce: A = sum / rows, G = sum * examples
            out = {}
            for bid in self.states:
                if bid in skip:
                    continue
                acc = self._acc.get(bid, {})
                a, g = acc.get("a"), acc.get("g")
                a_rows, g_rows = float(acc.get("a_rows", 0)), float(acc.get("g_rows", 0))
                a = a / a_rows if a is not None and a_rows > 0 else None
                g = g * g_rows if g is not None and g_rows > 0 else None
                if a is not None and g is not None and acc.get("f") is not None and acc.get("f_n", 0) > 0:
                    g = self._trace_corrected(a, g, acc["f"], float(acc["f_n"]), g_rows)
                out[bid] = (a, g)
            return out
        tensors, owners = {}, {}
        for block in self.blocks:
            acc = self._acc.get(block.block_id, {})
            a, g = acc.get("a"), acc.get("g")
            n_in, n_out = block.cols, block.rows
            # Every rank sends every key in the same dtype (the buckets are split by dtype).
            dtype = self.state_dtype
            tensors[f"{block.block_id}/a"] = a.to(dtype) if a is not None else torch.zeros(n_in, n_in, dtype=dtype)
            tensors[f"{block.block_id}/g"] = g.to(dtype) if g is not None else torch.zeros(n_out, n_out, dtype=dtype)
            # [A rows, G examples, sum of sampled per-example squared gradient norms, examples sampled]
            tensors[f"{block.block_id}/rows"] = torch.tensor(
                [float(acc.get("a_rows", 0)), float(acc.get("g_rows", 0)), 0.0, float(acc.get("f_n", 0))],
                dtype=dtype,
            )
            for key in ("a", "g", "rows"):
                owners[f"{block.block_id}/{key}"] = self.owner_of[block.block_id]
        device = self._device()
        tensors = {k: v.to(device) for k, v in tensors.items()}
        for block in self.blocks:
            f = self._acc.get(block.block_id, {}).get("f")
            if f is not None:
                tensors[f"{block.block_id}/rows"][2] = f.to(device)
        summed = self.exchange.reduce_to_owners(tensors, owners)
        out = {}
        for bid in self.states:
            if self.owner_of[bid] != self.rank:
                continue  # a replica: statistics live on the owner
            a_rows, g_rows, f_sum, f_n = summed[f"{bid}/rows"].tolist()  # one host read per block
            a = summed[f"{bid}/a"] / a_rows if a_rows > 0 else None
            # Each rank's loss is a mean over its own n/world examples, so its d carries world/n:
            # G = E[(n d)(n d)^T] over the n examples of the global batch (the mean-reduced loss
            # convention; what an example is follows kfac.weight_sharing, see ds_soo/layers/handlers.py).
            g = summed[f"{bid}/g"] * (g_rows / self.world_size**2) if g_rows > 0 else None
            if a is not None and g is not None and f_n > 0:
                g = self._trace_corrected(a, g, torch.tensor(f_sum, dtype=torch.float64), f_n, g_rows)
            out[bid] = (a, g)
        return out

    def _trace_corrected(
        self, a: torch.Tensor, g: torch.Tensor, f_sum: torch.Tensor, f_n: float | torch.Tensor,
        g_rows: float | torch.Tensor,
    ) -> torch.Tensor:
        """KFC's G rescaled so that tr(A) tr(G) is the empirical Fisher's trace (``kfac.trace_correction``).

        KFC assumes a layer's positions uncorrelated; where they are not (a ViT's value and key projections,
        its patch embedding, a pooled CNN), tr(A) tr(G) misses the Fisher's trace by up to T times. The
        Kronecker structure is KFC's; only its scale comes from the exact per-example trace.

        ``f_sum`` is the sum of the sampled per-example squared gradient norms (summed over ranks), ``f_n``
        how many examples were sampled and ``g_rows`` G's examples: for one block a 0-d tensor and two
        numbers, for a stack of equal-shaped blocks (batched statistics) (blocks,) tensors. Computed on
        the device, so a statistics step needs no host synchronisation for it.
        """
        # The same d scale as G: a per-example gradient is (n / world) sum_t d_t h_t^T.
        fisher = f_sum.to(g.device, torch.float64) / f_n * (g_rows / self.world_size) ** 2
        return trace_corrected(a, g, fisher)

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    # ----------------------------------------------------------------- the step
    def set_hyperparams(
        self, batch_size: float | None = None, lr: float | None = None, grad_clip: float | None = None
    ) -> None:
        """Tell the damping rule (and K-FAC's KL-clip) the current global batch size and learning rate.

        ``lr`` is for callers without a base optimizer: once one is known (``optimizer=``,
        ``set_base_optimizer``), the lr is read from its param groups at every step and ``lr`` here is not used.
        ``grad_clip`` hands over a caller's raw-gradient clip (a trainer's ``max_grad_norm``, DeepSpeed's
        ``gradient_clipping``): it must agree with the config's ``grad_clip`` when both are set.
        """
        if batch_size is not None:
            self.cfg.damping.batch_size = float(batch_size)
        if lr is not None and self.base_optimizer is None:
            self.cfg.damping.lr = float(lr)
        if grad_clip is not None and grad_clip > 0:
            own = self.cfg.grad_clip
            if own > 0 and own != float(grad_clip):
                raise ConfigError(
                    f"ds_soo.grad_clip={own:g} disagrees with the caller's gradient clipping {grad_clip:g} "
                    "(max_grad_norm / gradient_clipping / optim.grad_clip); set one of them"
                )
            self.cfg.grad_clip = float(grad_clip)

    def set_base_optimizer(self, optimizer: Any) -> None:
        """Tell the preconditioner which optimizer applies its output (see ``__init__``'s ``optimizer``)."""
        kl_clip, _ = resolve_kl_clip(self.cfg, innermost_optimizer(optimizer))
        self.base_optimizer = optimizer
        if needs_lr(self.cfg, kl_clip):
            check_config_lr(self._config_lr, optimizer, self._precond_param_ids)

    def effective_options(self) -> EffectiveOptions:
        """The options this config resolves to; raises ConfigError for what no one has decided yet."""
        base = innermost_optimizer(self.base_optimizer) if self.base_optimizer is not None else None
        kl_clip, why = resolve_kl_clip(self.cfg, base)
        if not needs_lr(self.cfg, kl_clip):
            lr_source = "not used (no KL-clip, and the damping rule does not read it)"
        elif self.base_optimizer is not None:
            lr_source = "the base optimizer's param groups, read every step"
        elif self._config_lr is not None:
            lr_source = f"damping.lr = {self._config_lr:g} (no base optimizer given)"
        else:
            lr_source = "set_hyperparams(lr=) (no base optimizer given)"
        base_name = type(base).__name__ if base is not None else None
        return EffectiveOptions(self.cfg.method, base_name, kl_clip, why, lr_source, describe_damping(self.cfg))

    def _resolve_for_step(self) -> None:
        """Resolve the options (logged at the first step and whenever they change) and take this step's lr
        from the base optimizer."""
        effective = self.effective_options()
        if effective != self._effective:
            log.info("ds_soo %s resolved:\n%s", self.cfg.method, "\n".join(effective.lines()))
            self._effective = effective
        if self.base_optimizer is not None and needs_lr(self.cfg, effective.kl_clip):
            self.cfg.damping.lr = optimizer_lr(self.base_optimizer, self._precond_param_ids)

    def kl_clip(self) -> float | None:
        """The KL-clip bound in force (None: off). ``"auto"`` is KAISA's 0.001 over an SGD base."""
        return self.effective_options().kl_clip

    def damping(self, step: int | None = None) -> float:
        c = self.cfg
        if c.damping.kind == "scaled" and (c.damping.batch_size is None or c.damping.lr is None):
            raise ConfigError(
                "damping.batch_size and damping.lr must be set when damping.kind is 'scaled' "
                "(set them in the config or call Preconditioner.set_hyperparams)"
            )
        if self.adaptive is not None:
            return self.adaptive.rule.value
        t = self.counters["optimizer_steps"] if step is None else step
        return damping_value(c.damping, method_default_damping(c), t)

    @property
    def wants_damping_feedback(self) -> bool:
        """True after an adaptation step of ``damping.kind: adaptive``, until ``damping_feedback`` is called.

        Known on the host from the schedule alone (no synchronisation), the same on every rank."""
        return self.adaptive is not None and self.adaptive.pending is not None

    def damping_feedback(self, loss_before: float | torch.Tensor, loss_after: float | torch.Tensor) -> float | None:
        """Report the loss on this step's batch before and after the base optimizer's step (this rank's
        micro-batches' mean; under gradient accumulation the mean over them). Collective: every rank calls
        it. Moves the adaptive damping by the Levenberg-Marquardt rule; returns the reduction ratio (None:
        not informative, no change). Evaluate ``loss_after`` inside ``paused_capture()`` so that the extra
        forward feeds no statistics."""
        if self.adaptive is None:
            raise ConfigError("damping_feedback needs ds_soo.damping.kind: adaptive (method kfac)")
        return self.adaptive.feedback(self, loss_before, loss_after)

    def _local_nonfinite(self) -> torch.Tensor | None:
        """A 0-d bool tensor, true if some held gradient entry is non-finite (None: no gradient held).

        One fused reduction and no host synchronisation: a max-norm is non-finite iff some entry is.
        """
        grads = [g for _, g in self._held_grads()]
        if not grads:
            return None
        norms = torch._foreach_norm(grads, float("inf"))
        return ~torch.isfinite(torch.stack([n.float() for n in norms])).all()

    def _any_rank(self, local: torch.Tensor | None) -> torch.Tensor | None:
        """A device-side OR of a 0-d bool tensor over ranks (one all_reduce, no host synchronisation)."""
        if self.world_size == 1:
            return local
        flag = torch.zeros(1, device=self._device()) if local is None else local.float().reshape(1).to(self._device())
        return self.exchange.all_sum(flag)[0] > 0

    def _stats_nonfinite(self) -> torch.Tensor | None:
        """A 0-d bool tensor, true if some captured K-FAC statistic is non-finite (no host synchronisation)."""
        stats = [t for acc in self._acc.values() for key in ("a", "g") if (t := acc.get(key)) is not None]
        if not stats:
            return None
        norms = torch._foreach_norm(stats, float("inf"))
        return ~torch.isfinite(torch.stack([n.float() for n in norms])).all()

    def _skip_step(self) -> None:
        """Skip curvature for this step; factors and inverses stay untouched.

        Under fp16 loss scaling the engine itself skips an overflowing step and lowers the scale, so
        the gradients are left for it to see. Otherwise every gradient is zeroed, and every path that
        steps an optimizer (``SecondOrderOptimizer``, the trainer, ``attach()``, HF, accelerate) must
        skip that optimizer's step when ``last_step_skipped`` is set: zeroed gradients would still move
        the weights through momentum or Adam state.
        """
        if self.access.grad_scale() == 1.0:
            for name in self.layouts:
                g = self.access.local_grad(name)
                if g is not None:
                    g.zero_()
        self.counters["skipped_nonfinite"] += 1
        self.last_step_skipped = True

    def _held_grads(self) -> list[tuple[str, torch.Tensor]]:
        """(name, held gradient); in one process the ``.grad`` itself (no flat view to dispatch)."""
        get = getattr(self.access, "raw_grad", None) or self.access.local_grad
        return [(n, g) for n in self.layouts if (g := get(n)) is not None and g.numel() > 0]

    def _clip_raw(self, bad: torch.Tensor | None, reads: _HostReads) -> tuple[int, int] | None:
        """Scale every gradient so the global norm of the raw averaged gradient is at most ``grad_clip``.

        Each rank sums squares over the range it *provides* (every element counted once, also where
        ranks hold replicas, as under DDP) and one all-reduce gives the total, so it works on ZeRO and
        FSDP2 shards; then each rank scales all it holds by the same factor. The factor is applied on
        the device (1 on a step found non-finite, whose gradients are left for the skip); the norm and
        whether it clipped are read back with the step's other decisions: (norm, clipped) read slots.
        """
        clip = self.cfg.grad_clip
        if clip <= 0:
            return None
        held = self._held_grads()
        parts = []
        for name, g in held:
            lay = self.layouts[name]
            (ps, pe), (hs, _) = lay.provided[self.rank], lay.held[self.rank]
            if (ps - hs, pe - hs) == (0, g.numel()):
                parts.append(g)
            elif pe > ps:
                parts.append(g.view(-1)[ps - hs : pe - hs])
        sq = torch.zeros(1, dtype=self.state_dtype, device=self._device())
        if parts:
            norms = torch._foreach_norm(parts, 2.0)
            sq = sq + torch.stack([n.to(sq.dtype) for n in norms]).pow(2).sum().to(sq.device)
        total = self.exchange.all_sum(sq).sqrt()[0].double() / self.access.grad_scale()
        clipped = total > clip
        if bad is not None:
            clipped = clipped & ~bad.to(clipped.device)
        factor = torch.where(clipped, clip / (total + 1e-6), torch.ones_like(total)).to(self.state_dtype)
        if held:
            torch._foreach_mul_([g for _, g in held], factor.to(held[0][1].device))
        return reads.add(total), reads.add(clipped)

    def _check_mc(self, stats_now: bool) -> None:
        if not (self.cfg.method == "kfac" and self.cfg.kfac.fisher == "mc" and stats_now):
            return
        if not self.exchange.any_true(self._mc_seen):
            raise ConfigError(
                "ds_soo.kfac.fisher is 'mc' but no sampled-label backward ran this statistics step: call "
                "Preconditioner.mc_fisher_backward(logits, loss_scale=1/grad_accum) after each micro-batch's "
                "forward (the ds_soo trainer and SecondOrderTrainer do), or set kfac.fisher to 'empirical'"
            )

    def _host_decisions_now(self, t: int, stats_now: bool) -> bool:
        """Whether this step decides on the host as it goes (refreshes, PSGD fits, MC checks, auto intervals).

        Every other step (a sparse step, statistics possibly due) keeps its decisions on the device as
        masks (non-finite skip, unused blocks, non-finite results, clipping, KL-clip) and reads them back
        once at its end. The answer is the same on every rank: it depends on the schedule only.
        """
        c = self.cfg
        if c.method == "none":
            return False
        if self.schedule.auto is not None or c.method == "psgd" and stats_now:
            return True
        if c.method == "kfac" and c.kfac.fisher == "mc" and stats_now:
            return True
        return any(self.schedule.refresh_due(t, b.block_id) for b in self.blocks)

    def step(self) -> bool:
        """Precondition this optimizer step's averaged gradients in place; True if any changed."""
        if self.adaptive is not None:
            self.adaptive.check_no_pending()
        self._resolve_for_step()
        t = self.counters["optimizer_steps"]
        self.last_step_skipped = False
        self.last_kl_scale = None
        method = self.cfg.method
        try:
            if getattr(self.access, "stale_unused_grads", False):
                self._zero_stale()
            stats_now = self._stats_now
            eager = self._eager = self._host_decisions_now(t, stats_now)
            reads = _HostReads()
            bad = self._any_rank(self._local_nonfinite()) if self.cfg.numerics.skip_nonfinite else None
            if eager and bad is not None:
                if bool(bad):
                    self._skip_step()
                    return False
                bad = None
            i_bad = reads.add(bad) if bad is not None else None
            snapshot = None
            if self.adaptive is not None and self.adaptive.due(t):
                # The raw gradient and the weights, before clipping and preconditioning write to the gradient.
                snapshot = self.adaptive.snapshot(t, self.damping(t), self.access, self.layouts)
            i_clip = self._clip_raw(bad, reads)
            if method == "none":
                reads.read()
                if i_bad is not None and reads[i_bad]:
                    self._skip_step()
                    return False
                self._settle_clip(reads, i_clip)
                return False
            damping = self.damping(t)
            self.last_damping = damping
            self._check_mc(stats_now)
            captured: dict[str, bool] = {}
            if method == "kfac":
                names = [b.block_id for b in self.blocks]
                captured = dict(zip(names, self.exchange.any_true_many([n in self._fwd_ran for n in names]),
                                    strict=True))
            i_stats = None
            # A statistics step with no forward captured on any rank (step() called before any forward)
            # has nothing to fold in and must not count as a statistics update.
            if method == "kfac" and stats_now and any(captured.values()):
                i_stats = self._update_kfac_stats(t, bad, eager, reads)
            results, refreshed, outcome = self._precondition_owned(t, stats_now, damping, captured, bad, reads)
            writer = self._local_exchange if self.replicated else self.exchange
            writer.scatter_blocks(self.block_index, self.owner_of, results)
            reads.read()  # the step's one host synchronisation (a sparse step has no other)
            for i_active, undo in reads.undo:
                if not reads[i_active]:
                    undo()
            if i_bad is not None and reads[i_bad]:
                self._skip_step()
                return False
            self._settle_clip(reads, i_clip)
            if i_stats is not None and reads[i_stats]:
                self.counters["stats_updates"] += 1
            elif i_stats is not None:
                log.warning("step %d: non-finite curvature statistics dropped", t)
            changed_here, uncaptured = self._settle_blocks(t, reads, outcome)
            names = [b.block_id for b in self.blocks] if method == "kfac" else []
            flags = self.exchange.any_true_many([changed_here, refreshed] + [n in uncaptured for n in names])
            changed, refreshed_any = flags[0], flags[1]
            if method == "kfac":
                self._note_uncaptured(t, [n for n, f in zip(names, flags[2:], strict=True) if f])
            if method != "kfac" and stats_now:
                self.counters["stats_updates"] += 1
            if refreshed_any:
                self.counters["curvature_refreshes"] += 1
                self.last_refresh_step = t
            if changed:
                self.counters["preconditioned_steps"] += 1
            if snapshot is not None:
                self.adaptive.pending = snapshot
            return changed
        finally:
            self._acc.clear()
            self._fwd_ran.clear()
            self._got_grad.clear()
            self._mc_outputs = []
            self._mc_seen = False
            self.counters["optimizer_steps"] = t + 1
            self._stats_now = self.schedule.stats_due(t + 1)

    def _settle_clip(self, reads: _HostReads, slots: tuple[int, int] | None) -> None:
        if slots is None:
            return
        self.last_grad_norm = reads[slots[0]]
        if reads[slots[1]]:
            self.counters["clipped_steps"] += 1

    def _update_kfac_stats(self, t: int, bad: torch.Tensor | None, eager: bool, reads: _HostReads) -> int:
        """Fold this step's K-FAC statistics into the owners' factors unless some are non-finite (or the
        step is); returns the read slot of that decision. Factors created under a pending decision are
        reset to None if it turns out false."""
        stats_bad = self._any_rank(self._stats_nonfinite())
        if eager and stats_bad is not None and bool(stats_bad):
            i_ok = reads.add(False)
            return i_ok
        if eager:
            stats_bad = None
        ok = None
        for flag in (bad, stats_bad):
            if flag is not None:
                ok = ~flag if ok is None else ok & ~flag
        i_ok = reads.add(True if ok is None else ok)
        done: set[str] = set()
        if self.batch_equal_blocks and self.world_size == 1:
            # Equal-shaped factors that already exist are averaged in as one batched op per shape.
            by_shape: dict[tuple, list[str]] = {}
            for bid, st in self.states.items():
                acc = self._acc.get(bid, {})
                a, g = acc.get("a"), acc.get("g")
                if (a is not None and g is not None and acc["a_rows"] > 0 and acc["g_rows"] > 0
                        and st.a is not None and st.g is not None):
                    by_shape.setdefault((tuple(a.shape), tuple(g.shape)), []).append(bid)
            for bids in by_shape.values():
                states = [self.states[b] for b in bids]
                a, g, trace = batched.kfac_step_factors([self._acc[b] for b in bids], states[0].a.device)
                if trace is not None:  # kfac.trace_correction, as _reduced_factors does block by block
                    g = self._trace_corrected(a, g, *trace)
                batched.kfac_stats(states, a, g, ok)
                done.update(bids)
        factors = self._reduced_factors(skip=done)
        for bid, (a, g) in factors.items():
            state = self.states[bid]
            created = state.update_factors(a, g, ok)
            if created:
                reads.undo.append((i_ok, lambda s=state, keys=tuple(created): [setattr(s, k, None)
                                                                                      for k in keys]))
        return i_ok

    def _note_uncaptured(self, t: int, uncaptured: list[str]) -> None:
        """Count (on every rank) and log (once per block) K-FAC blocks passed through this step.

        ``uncaptured`` is already agreed over ranks."""
        for name in uncaptured:
            self.counters["uncaptured_passthrough"] += 1
            if name not in self._warned_uncaptured:
                self._warned_uncaptured.add(name)
                log.warning(
                    "step %d: K-FAC layer %s got a gradient but its forward hook never ran (its weight is used "
                    "functionally); its gradient goes to the base optimizer unpreconditioned", t, name,
                )

    def _psgd_generator(self, bid: str, t: int) -> torch.Generator:
        """Probe RNG of one PSGD fit: a function of (psgd.seed, block id, step) only, never of the rank."""
        digest = hashlib.sha256(f"{self.cfg.psgd.seed}:{bid}:{t}".encode()).digest()
        return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def _precondition_owned(
        self, t: int, stats_now: bool, damping: float, captured: dict[str, bool], bad: torch.Tensor | None,
        reads: _HostReads,
    ) -> tuple[dict, bool, _BlockOutcome]:
        """Update, refresh and apply this rank's blocks: (results, any refreshed, what to settle after the read).

        ``bad`` (a pending device-side non-finite flag) is given on a deferred step only; then which blocks
        are unused (an exactly-zero gradient) is a device mask too, and every state change is masked by it.
        """
        c = self.cfg
        reader = self._local_exchange if self.replicated else self.exchange
        scale = self.access.grad_scale()
        groups, grads = self._batch_groups(t, stats_now, captured, scale)
        batched_ids = {bid for grp in groups for bid in grp.bids}
        index = {b: p for b, p in self.block_index.items() if b not in batched_ids} if groups else self.block_index
        vecs = reader.gather_blocks(index, self.owner_of)
        dtype = torch.float64 if c.numerics.inverse_dtype == "float64" else torch.float32
        results: dict[str, torch.Tensor] = {}
        outcome = _BlockOutcome()
        refreshed = False
        by_id = {b.block_id: b for b in self.blocks}
        work, due, to_refresh = [], [], []
        present = [bid for bid in self.states if vecs.get(bid) is not None]
        # An exactly-zero gradient is an unused layer: DDP leaves None where ZeRO and FSDP2
        # materialise zeros, and both must leave the block's statistics and grafting state alone.
        # One reduction for all blocks; read on the host now only on a step that refreshes.
        nonzero: list[Any] = []
        if present:
            peaks = torch.stack([vecs[b].abs().amax() for b in present])
            nonzero = (peaks != 0).tolist() if self._eager else list((peaks != 0).unbind())
        for bid, nz in zip(present, nonzero, strict=True):
            if nz is False:
                continue
            if c.method == "kfac" and not captured.get(bid, True):
                # A gradient without a forward hook: the weight was used functionally. Never drop it.
                results[bid] = vecs[bid]
                if self.owner_of[bid] == self.rank:
                    outcome.uncaptured.append((bid, reads.add(nz)))
                continue
            state, vec = self.states[bid], vecs[bid]
            block = by_id[bid]
            mat = block.to_matrix(as_state(vec)) / scale
            active = None if nz is True else (nz if bad is None else nz & ~bad)
            work.append((bid, block, state, vec, mat, active))
            is_due = stats_now if c.method == "psgd" else self.schedule.refresh_due(t, bid)
            if is_due and not self._eager:
                raise AssertionError("a refresh on a step that defers its decisions")  # _host_decisions_now
            if is_due:
                due.append(bid)
            if self.owner_of[bid] != self.rank:
                continue  # a replica: its inverse arrives from the owner below
            if c.method == "shampoo" and stats_now:
                if state.update_stats(mat, active) and active is not None:
                    reads.undo.append((reads.add(active), lambda s=state: _forget_stats(s)))
            if is_due:
                if c.method == "kfac" and (state.a is None or state.g is None):
                    continue  # no statistics yet (e.g. a layer not run so far): nothing to invert, no failure
                before = self.schedule.probe_before_refresh(t, state, mat)  # sparse_interval=auto only
                to_refresh.append((bid, state, mat, before))  # all together below
        if to_refresh:
            if c.method == "psgd":
                oks = [s.fit(m, damping, c.psgd.fit_iterations, generator=self._psgd_generator(bid, t))
                       for bid, s, m, _ in to_refresh]  # fmt: skip
            else:  # one batched factorisation per factor shape rather than one per factor
                oks = batched_refresh.refresh_states([s for _, s, _, _ in to_refresh], damping, dtype,
                                                     c.numerics.retry_float64)
            for (bid, state, mat, before), ok in zip(to_refresh, oks, strict=True):
                refreshed |= ok
                self._count_refresh(bid, ok)
                if ok:
                    self.schedule.after_refresh(bid, t, state, mat, before)
        if self.replicated and due:
            self._broadcast_inverses(due)
        pending, extra_terms = [], []
        for grp in groups:
            mat = batched.matrices(grp, grads)
            active = mat.abs().amax(dim=(1, 2)) != 0
            if bad is not None:
                active = active & ~bad
            undo: list = []
            if c.method == "shampoo" and stats_now:
                batched.shampoo_stats(grp, mat, active)
            out = batched.apply(grp, mat, active, undo)
            ok = torch.isfinite(out).flatten(1).all(1) & active
            i_ok, i_active = reads.add(ok), reads.add(active)
            reads.undo.extend(((i_active, j), action) for j, action in undo)
            outcome.groups.append((grp.bids, i_ok, i_active))
            pending.append((grp, mat, out, ok))
            extra_terms.append(torch.where(ok, (out * mat).sum(dim=(1, 2)), 0.0))
        outs: dict[str, torch.Tensor] = {}
        ok_of: dict[str, torch.Tensor] = {}
        for bid, _, state, _, mat, active in work:
            if not state.ready:
                continue
            if c.method == "shampoo":
                outs[bid] = state.precondition(mat, active)
                if active is not None and state.grafting == "adam":
                    reads.undo.append((reads.add(active), state.undo_graft_step))
            else:
                outs[bid] = state.precondition(mat)
            finite = torch.isfinite(outs[bid]).all()
            ok_of[bid] = finite if active is None else finite & active
            outcome.blocks.append((bid, reads.add(ok_of[bid]), None if active is None else reads.add(active)))
        nu = self._kl_scale(work, outs, ok_of, extra_terms)
        if nu is not None:
            outcome.i_nu = reads.add(nu)
        for grp, mat, out, ok in pending:
            out = out if nu is None else out * nu.to(out.device, out.dtype)
            batched.write_back(grp, grads, batched.masked(ok, out, mat))
        for bid, block, _, vec, _, _ in work:
            if bid in outs:
                out = outs[bid] if nu is None else outs[bid] * nu.to(outs[bid].device, outs[bid].dtype)
                results[bid] = torch.where(ok_of[bid], block.from_matrix(out * scale), vec)
            else:
                results[bid] = vec
        return results, refreshed, outcome

    def _batch_groups(
        self, t: int, stats_now: bool, captured: dict[str, bool], scale: float
    ) -> tuple[list[batched.Group], dict[str, torch.Tensor]]:
        """Equal-shaped blocks to precondition as batched ops on this step (one process only).

        A block whose refresh is due goes through the per-block path (refreshed, then applied); its
        equal-shaped peers stay batched, so that staggered refreshes (a block or two on most steps of
        the sparse phase) do not turn those steps into per-block loops."""
        raw = getattr(self.access, "raw_grad", None)
        if not self.batch_equal_blocks or raw is None or self.world_size != 1 or self.replicated or scale != 1.0:
            return [], {}
        if self.schedule.auto is not None or self.cfg.method == "psgd" and stats_now:
            return [], {}
        due: set[str] = set()  # PSGD refreshes (fits) on statistics steps, which are not batched at all
        if self._eager and self.cfg.method != "psgd":
            due = {b.block_id for b in self.blocks if self.schedule.refresh_due(t, b.block_id)}
        grads = {n: g for n in self.layouts if (g := raw(n)) is not None}
        shapes = {n: tuple(g.shape) for n, g in grads.items()}
        by_key: dict[tuple, list[MatrixBlock]] = {}
        split: set[tuple] = set()  # keys with a block refreshing on this step
        for block in self.blocks:
            state = self.states[block.block_id]
            if any(name not in grads for name, _ in block.pieces) or not captured.get(block.block_id, True):
                continue
            key = batched.group_key(self.cfg.method, block, state, shapes)
            if key is None:
                continue
            if block.block_id in due:
                split.add(key)
            else:
                by_key.setdefault(key, []).append(block)
        if split:
            # A cached group of a split shape would keep stacks its states no longer view: drop it (a later
            # step with none of them due stacks it anew).
            for ids in [ids for ids in self._groups if ids[0] in split]:
                del self._groups[ids]
        groups = []
        for key, blocks in by_key.items():
            states = [self.states[b.block_id] for b in blocks]
            if key in split:
                groups.append(batched.make_group(self.cfg.method, blocks, states, transient=True))
                continue
            ids = (key, tuple(b.block_id for b in blocks))
            grp = self._groups.get(ids)
            if grp is None or any(s is not self.states[b] for s, b in zip(grp.states, grp.bids, strict=True)):
                grp = self._groups[ids] = batched.make_group(self.cfg.method, blocks, states)
            groups.append(grp)
        return groups, grads

    def _settle_blocks(self, t: int, reads: _HostReads, outcome: _BlockOutcome) -> tuple[bool, list[str]]:
        """Host bookkeeping of the blocks once the step's decisions are read: (any changed, uncaptured)."""
        changed = False
        for bids, i_ok, i_active in outcome.groups:
            for bid, ok, active in zip(bids, reads[i_ok], reads[i_active], strict=True):
                if ok:
                    changed = True
                    self.block_preconditioned[bid] = self.block_preconditioned.get(bid, 0) + 1
                elif active:
                    log.warning("step %d: block %s produced a non-finite update; gradient left as is", t, bid)
        for bid, i_ok, i_active in outcome.blocks:
            if reads[i_ok]:
                changed = True
                self.block_preconditioned[bid] = self.block_preconditioned.get(bid, 0) + 1
            elif i_active is None or reads[i_active]:
                log.warning("step %d: block %s produced a non-finite update; gradient left as is", t, bid)
        if outcome.i_nu is not None:
            self.last_kl_scale = reads[outcome.i_nu]
        return changed, [bid for bid, i in outcome.uncaptured if reads[i]]

    def _kl_scale(
        self, work: list, outs: dict[str, torch.Tensor], ok_of: dict[str, torch.Tensor], extra: list[torch.Tensor]
    ) -> torch.Tensor | None:
        """K-FAC's KL-clip factor nu = min(1, sqrt(kl_clip / (lr^2 sum_i <P g_i, g_i>))) (Ba et al. 2017).

        The sum runs over every preconditioned block of the model: each owner adds its own blocks
        (replicas too compute, but only owners count) and one all-reduce gives every rank the total.
        Blocks whose result is not used (non-finite, unused) add zero. A 0-d float64 tensor.
        """
        bound = self.kl_clip()
        if bound is None:
            return None
        lr = self.cfg.damping.lr
        if lr is None:
            raise ConfigError(
                "ds_soo.kfac.kl_clip needs the learning rate: pass optimizer= (its lr is read every step), set "
                "damping.lr, or call Preconditioner.set_hyperparams(lr=)"
            )
        device = self._device()
        terms = [torch.where(ok_of[bid], (outs[bid] * mat).sum(), 0.0).to(device) for bid, _, _, _, mat, _ in work
                 if bid in outs and self.owner_of[bid] == self.rank]
        parts = ([torch.stack(terms)] if terms else []) + [e.to(device) for e in extra]  # batched blocks: owned
        local = torch.cat(parts).double().sum().reshape(1) if parts else torch.zeros(1, dtype=torch.float64,
                                                                                     device=device)
        vg = self.exchange.all_sum(local.to(device))[0] * lr**2
        nu = torch.where(vg > 0, (bound / vg).sqrt().clamp(max=1.0), torch.ones_like(vg))
        return nu

    def _broadcast_inverses(self, due: list[str]) -> None:
        """Copy each refreshed block's inverse pair from its owner to every rank (replicated mode).

        Each state names its own fields (``root_shapes``): a diagonal block has other ones.
        """
        device = self._device()
        tensors, owners = {}, {}
        for bid in due:
            state = self.states[bid]
            for f, shape in state.root_shapes().items():
                value = getattr(state, f)
                tensors[f"{bid}/{f}"] = (value.to(self.state_dtype, copy=True) if value is not None
                                         else torch.zeros(shape, dtype=self.state_dtype, device=device))
                owners[f"{bid}/{f}"] = self.owner_of[bid]
            # A block whose owner has no inverse yet must not receive zeros as one.
            tensors[f"{bid}/valid"] = torch.tensor([float(state.ready)], device=device)
            owners[f"{bid}/valid"] = self.owner_of[bid]
        self.exchange.broadcast_from_owners(tensors, owners)
        for bid in due:
            if self.owner_of[bid] == self.rank or not bool(tensors[f"{bid}/valid"].item()):
                continue
            for f in self.states[bid].root_shapes():
                setattr(self.states[bid], f, tensors[f"{bid}/{f}"])

    def _count_refresh(self, bid: str, ok: bool) -> None:
        if ok:
            self.block_refreshes[bid] = self.block_refreshes.get(bid, 0) + 1
        else:
            self.counters["inverse_failures"] += 1

    # ----------------------------------------------------------------- reporting
    def describe(self) -> str:
        lines = [
            f"ds_soo {self.cfg.method}: {len(self.blocks)} blocks over "
            f"{len({n for b in self.blocks for n, _ in b.pieces})} parameters "
            f"(rank {self.rank}/{self.world_size} owns {len(self.states)})"
        ]
        for b in self.blocks:
            lines.append(f"  preconditioned  {b.block_id}  {b.rows}x{b.cols}  owner={self.owner_of[b.block_id]}")
        for name, why in self.fall_through.items():
            lines.append(f"  base optimizer  {name}  ({why})")
        if self._warned_uncaptured:
            lines.append(
                f"  base optimizer on steps where their forward hook did not run: {sorted(self._warned_uncaptured)}"
            )
        if self.cfg.grad_clip > 0:
            lines.append(f"  raw gradient clipped to norm {self.cfg.grad_clip:g} before preconditioning")
        try:
            lines += self.effective_options().lines()
        except ConfigError as err:
            lines.append(f"  unresolved until a base optimizer is given: {err}")
        return "\n".join(lines)

    def curvature_bytes(self) -> int:
        """Bytes of factors, roots and inverses held by this rank."""
        return sum(s.nbytes() for s in self.states.values())

    def metrics(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.counters.items()}
        out["damping"] = self.last_damping
        if self.adaptive is not None:
            out["damping_adaptations"] = float(self.adaptive.rule.adaptations)
            if self.adaptive.rule.last_ratio is not None:
                out["damping_ratio"] = self.adaptive.rule.last_ratio
        t = self.counters["optimizer_steps"]
        out["steps_since_refresh"] = float(t - self.last_refresh_step) if self.last_refresh_step is not None else -1.0
        out["curvature_bytes"] = float(self.curvature_bytes())
        if self.last_grad_norm is not None:
            out["grad_norm_raw"] = self.last_grad_norm
        if self.last_kl_scale is not None:
            out["kl_scale"] = self.last_kl_scale
        if getattr(self, "last_quality", None) is not None:
            out["quality_index"] = float(self.last_quality)
        return out

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.cfg.method,
            "counters": dict(self.counters),
            "last_refresh_step": self.last_refresh_step,
            "block_refreshes": dict(self.block_refreshes),
            "block_preconditioned": dict(self.block_preconditioned),
            # sparse_interval="auto": each block's interval, streak and frozen flag (kept by its owner)
            "block_auto": self.schedule.auto.state_dict() if self.schedule.auto is not None else {},
            "blocks": {bid: s.state_dict() for bid, s in self.states.items()},
            # damping.kind="adaptive": the current damping (the same on every rank).
            "damping_rule": self._damping_rule_state(),
        }

    def _damping_rule_state(self) -> dict[str, Any] | None:
        if self.adaptive is None:
            return None
        if self.adaptive.pending is not None:
            log.warning("ds_soo state saved between step %d and its damping feedback: a resume will not adapt "
                        "the damping from that step", self.adaptive.pending.step)  # fmt: skip
        return self.adaptive.rule.state_dict()

    _PER_BLOCK_KEYS = ("blocks", "block_refreshes", "block_preconditioned", "block_auto")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; a ConfigError (and no change) when it does not fit these blocks."""
        if state.get("method") != self.cfg.method:
            raise ConfigError(
                f"checkpoint was written by method {state.get('method')!r}, config says {self.cfg.method!r}"
            )
        self._check_block_ids(state)
        loaded = self._loaded_states(state["blocks"])
        self.counters.update(state["counters"])
        self.last_refresh_step = state.get("last_refresh_step")
        self.block_refreshes = dict(state.get("block_refreshes", {}))
        self.block_preconditioned = dict(state.get("block_preconditioned", {}))
        if self.schedule.auto is not None:
            self.schedule.auto.load_state_dict(state.get("block_auto", {}))
        if self.adaptive is not None:
            rule = state.get("damping_rule")
            if rule is not None:
                self.adaptive.rule.load_state_dict(rule)
            else:
                log.warning("ds_soo state has no adaptive damping (written with another damping.kind): the "
                            "damping starts again from %g", self.adaptive.rule.value)  # fmt: skip
            self.adaptive.pending = None
        self.states.update(loaded)
        self._stats_now = self.schedule.stats_due(self.counters["optimizer_steps"])

    def _check_block_ids(self, state: dict[str, Any]) -> None:
        """Refuse state for blocks this preconditioner does not have: dropping it would silently reset them."""
        saved = set().union(*(state.get(key) or {} for key in self._PER_BLOCK_KEYS))
        unknown = sorted(saved - set(self.block_index))
        if unknown:
            raise ConfigError(
                f"ds_soo state holds {len(unknown)} curvature blocks this preconditioner does not have: "
                f"{unknown[:5]}{'...' if len(unknown) > 5 else ''}; the blocking changed (another model, exclude "
                "patterns, max_preconditioner_dim, or a ds_soo version that blocks differently)"
            )

    def _loaded_states(self, blocks: dict[str, Any]) -> dict[str, Any]:
        """Fresh states of this rank's blocks filled from ``blocks``, so that a failure changes nothing."""
        by_id = {b.block_id: b for b in self.blocks}
        out = {}
        for bid, sd in blocks.items():
            if bid not in self.states:
                continue  # another rank's block
            fresh = self._new_state(by_id[bid])
            try:
                fresh.load_state_dict(sd)
            except ValueError as err:
                raise ConfigError(f"ds_soo state of block {bid} does not fit it: {err}") from err
            out[bid] = fresh
        return out

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
