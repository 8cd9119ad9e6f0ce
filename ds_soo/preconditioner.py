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
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.curvature.kfac import KFACBlock
from ds_soo.curvature.psgd import PSGDKronBlock
from ds_soo.curvature.shampoo import ShampooBlock
from ds_soo.distributed.assignment import assign_blocks
from ds_soo.distributed.exchange import BlockIndex, Exchange, LocalExchange
from ds_soo.distributed.layout import GradientAccess, LocalGradientAccess
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
)


@dataclass
class MatrixBlock:
    """A preconditioned unit: its gradient vector's pieces and the map from vector to matrix."""

    block_id: str
    pieces: list[tuple[str, torch.Tensor]]
    rows: int
    cols: int
    layer: LayerHandler | None = None

    def to_matrix(self, vec: torch.Tensor) -> torch.Tensor:
        return self.layer.to_matrix(vec) if self.layer else vec.view(self.rows, self.cols)

    def from_matrix(self, mat: torch.Tensor) -> torch.Tensor:
        return self.layer.from_matrix(mat) if self.layer else mat.reshape(-1)

    @property
    def dims(self) -> list[int]:
        return [self.rows, self.cols]


def _tile_blocks(name: str, shape: tuple[int, ...], max_dim: int) -> list[MatrixBlock]:
    """Shampoo/PSGD blocks of a parameter viewed as (shape[0], rest), tiled to at most max_dim."""
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    flat = torch.arange(rows * cols).view(rows, cols)
    blocks = []
    for r0 in range(0, rows, max_dim):
        for c0 in range(0, cols, max_dim):
            r1, c1 = min(r0 + max_dim, rows), min(c0 + max_dim, cols)
            single = r0 == 0 and c0 == 0 and r1 == rows and c1 == cols
            bid = name if single else f"{name}[{r0}:{r1},{c0}:{c1}]"
            idx = flat[r0:r1, c0:c1].reshape(-1)
            blocks.append(MatrixBlock(bid, [(name, idx)], r1 - r0, c1 - c0))
    return blocks


class Preconditioner:
    """K-FAC, Shampoo or PSGD-Kron preconditioning of a model's gradients at the step boundary."""

    def __init__(
        self,
        model: nn.Module,
        config: PreconditionerConfig | dict[str, Any] | None = None,
        *,
        access: GradientAccess | None = None,
        exchange: Exchange | None = None,
    ):
        self.cfg = PreconditionerConfig.from_dict(config)
        self.model = model
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
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

        shapes = {n: tuple(lay.shape) for n, lay in self.layouts.items()}
        self.blocks, self.fall_through = self._build_blocks(shapes)
        self.block_index: BlockIndex = {b.block_id: b.pieces for b in self.blocks}
        self.owner_of = self._assign()
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
        self._mc_capture = False
        self._acc: dict[str, dict[str, Any]] = {}
        self._hooks = self._register_hooks() if self.cfg.method == "kfac" else []
        self._ran: set[int] = set()
        self._hooks += self._register_usage_hooks()
        log.info(self.describe())

    @classmethod
    def for_engine(
        cls, wrapped: Any, config: PreconditionerConfig | dict[str, Any] | None = None, **access_kwargs: Any
    ) -> Preconditioner:
        """A preconditioner for a DDP-wrapped, FSDP2-sharded or DeepSpeed-engine model (or a plain one).

        Hooks go on the inner module; the engine adapter says where each rank's gradient shards live.
        ``access_kwargs`` go to the adapter, e.g. ``scaler=`` a ``torch.amp.GradScaler`` under DDP.
        """
        from ds_soo.distributed.engines import access_for

        inner = getattr(wrapped, "module", wrapped)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return cls(inner, config)
        return cls(inner, config, access=access_for(wrapped, **access_kwargs))

    # ----------------------------------------------------------------- construction
    def _default_exchange(self) -> Exchange:
        if self.access.world_size == 1:
            return LocalExchange(self.access)
        from ds_soo.distributed.collective import CollectiveExchange

        return CollectiveExchange(self.access, bucket_mb=self.cfg.dist.bucket_mb)

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
            blocks.extend(_tile_blocks(name, shape, max_dim))
        return blocks, reasons

    def _assign(self) -> dict[str, int]:
        if self.world_size == 1:
            return {b.block_id: 0 for b in self.blocks}
        self.assignment = assign_blocks(
            {b.block_id: b.dims for b in self.blocks}, self.world_size, strategy=self.cfg.dist.assignment
        )
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
            return KFACBlock(block.cols, block.rows, c.kfac.ema_decay, c.kfac.pi_damping)
        if c.method == "shampoo":
            s = c.shampoo
            return ShampooBlock(block.rows, block.cols, s.beta2, s.exponent, s.grafting, s.graft_beta2, s.graft_epsilon)
        return PSGDKronBlock(block.rows, block.cols, c.psgd.precond_lr, c.psgd.init_scale)

    # ----------------------------------------------------------------- K-FAC capture
    def _register_hooks(self) -> list:
        handles = []
        for block in self.blocks:
            handles.append(block.layer.module.register_forward_hook(self._make_forward_hook(block.layer)))
        return handles

    def _register_usage_hooks(self) -> list:
        """Record which modules ran this step, to tell unused parameters from used ones.

        DeepSpeed ZeRO-3 (0.19) keeps the previous step's gradient partition for a parameter that
        got no gradient this step and applies it again; a parameter whose modules ran on no rank
        must have a zero gradient, so ``step()`` zeroes it.
        """
        self._param_modules: dict[str, list[int]] = {}
        canonical = {id(p): n for n, p in self.model.named_parameters()}
        handles = []
        for module in self.model.modules():
            names = [canonical[id(p)] for p in module.parameters(recurse=False) if canonical.get(id(p)) in self.layouts]
            if not names:
                continue
            for n in names:
                self._param_modules.setdefault(n, []).append(id(module))
            handles.append(module.register_forward_hook(self._mark_ran))
        return handles

    def _mark_ran(self, module: nn.Module, inputs, output) -> None:
        if torch.is_grad_enabled():
            self._ran.add(id(module))

    def _zero_unused(self) -> None:
        names = list(self._param_modules)
        ran = self.exchange.any_true_many([any(m in self._ran for m in self._param_modules[n]) for n in names])
        for name, used in zip(names, ran, strict=True):
            if not used:
                g = self.access.local_grad(name)
                if g is not None:
                    g.zero_()

    def _capturing(self, module: nn.Module) -> bool:
        return self._stats_now and module.training and torch.is_grad_enabled()

    def _make_forward_hook(self, layer: LayerHandler):
        def forward_hook(module, inputs, output):
            if not self._capturing(module):
                return
            acc = self._acc.setdefault(layer.name, {"a": None, "a_rows": 0, "g": None, "g_rows": 0})
            rows = layer.input_rows(inputs[0])
            with torch.autocast(rows.device.type, enabled=False):  # fp32 statistics even under autocast
                aa = rows.T @ rows
            acc["a"] = aa if acc["a"] is None else acc["a"] + aa
            acc["a_rows"] += rows.shape[0]
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._make_grad_hook(layer))

        return forward_hook

    def _make_grad_hook(self, layer: LayerHandler):
        def grad_hook(grad):
            if self.cfg.kfac.fisher == "mc" and not self._mc_capture:
                return
            acc = self._acc[layer.name]
            rows = layer.output_rows(grad)
            scale = 1.0 if self._mc_capture else self.access.grad_scale()
            if scale != 1.0:
                rows = rows / scale  # d of the training loss carries the fp16 loss scale; G must not (S^2)
            with torch.autocast(rows.device.type, enabled=False):
                gg = rows.T @ rows
            acc["g"] = gg if acc["g"] is None else acc["g"] + gg
            acc["g_rows"] += rows.shape[0]

        return grad_hook

    @contextlib.contextmanager
    def capturing_mc(self) -> Iterator[None]:
        """Backward passes inside this context feed G when ``kfac.fisher == "mc"``."""
        self._mc_capture = True
        try:
            yield
        finally:
            self._mc_capture = False

    def mc_fisher_backward(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Sample targets from the model's softmax and backprop their loss into G only (no .grad)."""
        if not logits.requires_grad:
            return
        flat = logits.reshape(-1, logits.shape[-1]).float()
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(flat, dim=-1), 1, generator=generator).squeeze(1)
        loss = nn.functional.cross_entropy(flat, sampled)
        inputs = [p for p in self.model.parameters() if p.requires_grad]
        with self.capturing_mc():
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)

    def _reduced_factors(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Sum this step's local factor statistics over ranks, to each layer's owner only."""
        tensors, owners = {}, {}
        for block in self.blocks:
            acc = self._acc.get(block.block_id, {})
            a, g = acc.get("a"), acc.get("g")
            n_in, n_out = block.cols, block.rows
            tensors[f"{block.block_id}/a"] = a if a is not None else torch.zeros(n_in, n_in)
            tensors[f"{block.block_id}/g"] = g if g is not None else torch.zeros(n_out, n_out)
            tensors[f"{block.block_id}/rows"] = torch.tensor(
                [float(acc.get("a_rows", 0)), float(acc.get("g_rows", 0))]
            )
            for key in ("a", "g", "rows"):
                owners[f"{block.block_id}/{key}"] = self.owner_of[block.block_id]
        device = self._device()
        tensors = {k: v.to(device) for k, v in tensors.items()}
        summed = self.exchange.reduce_to_owners(tensors, owners)
        out = {}
        for bid in self.states:
            if self.owner_of[bid] != self.rank:
                continue  # a replica: statistics live on the owner
            a_rows, g_rows = (float(x) for x in summed[f"{bid}/rows"])
            a = summed[f"{bid}/a"] / a_rows if a_rows > 0 else None
            # Gradients arrive averaged over the data-parallel ranks, so each row's d carries 1/world;
            # G = E[(n d)(n d)^T] with n rows in the global batch (mean-reduced loss convention).
            g = summed[f"{bid}/g"] * (g_rows / self.world_size**2) if g_rows > 0 else None
            out[bid] = (a, g)
        return out

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    # ----------------------------------------------------------------- the step
    def set_hyperparams(self, batch_size: float | None = None, lr: float | None = None) -> None:
        """Tell the damping rule the current global batch size and learning rate."""
        if batch_size is not None:
            self.cfg.damping.batch_size = float(batch_size)
        if lr is not None:
            self.cfg.damping.lr = float(lr)

    def damping(self, step: int | None = None) -> float:
        c = self.cfg
        if c.damping.kind == "scaled" and (c.damping.batch_size is None or c.damping.lr is None):
            raise ConfigError(
                "damping.batch_size and damping.lr must be set when damping.kind is 'scaled' "
                "(set them in the config or call Preconditioner.set_hyperparams)"
            )
        default = {"kfac": c.kfac.default_damping, "shampoo": c.shampoo.default_damping}.get(
            c.method, c.psgd.default_damping
        )
        return damping_value(c.damping, default, self.counters["optimizer_steps"] if step is None else step)

    def _local_nonfinite(self) -> bool:
        grads = [g for g in (self.access.local_grad(n) for n in self.layouts) if g is not None and g.numel() > 0]
        if not grads:
            return False
        # One fused reduction and one host sync: a max-norm is non-finite iff some entry is.
        norms = torch._foreach_norm(grads, float("inf"))
        return not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())

    def _stats_nonfinite(self) -> bool:
        for acc in self._acc.values():
            for key in ("a", "g"):
                t = acc.get(key)
                if t is not None and not bool(torch.isfinite(t).all()):
                    return True
        return False

    def _skip_step(self) -> None:
        """Skip curvature for this step; factors and inverses stay untouched.

        Under fp16 loss scaling the engine itself skips an overflowing step and lowers the scale, so
        the gradients are left for it to see. Otherwise every gradient is zeroed so that no NaN can
        reach the weights even through an optimizer the caller steps unconditionally.
        """
        if self.access.grad_scale() == 1.0:
            for name in self.layouts:
                g = self.access.local_grad(name)
                if g is not None:
                    g.zero_()
        self.counters["skipped_nonfinite"] += 1
        self.last_step_skipped = True

    def step(self) -> bool:
        """Precondition this optimizer step's averaged gradients in place; True if any changed."""
        t = self.counters["optimizer_steps"]
        self.last_step_skipped = False
        method = self.cfg.method
        try:
            if method == "none":
                return False
            damping = self.damping(t)
            self.last_damping = damping
            self._zero_unused()
            if self.cfg.numerics.skip_nonfinite and self.exchange.any_true(self._local_nonfinite()):
                self._skip_step()
                return False
            stats_now = self._stats_now
            if method == "kfac" and stats_now:
                if self.exchange.any_true(self._stats_nonfinite()):
                    log.warning("step %d: non-finite curvature statistics dropped", t)
                else:
                    for bid, (a, g) in self._reduced_factors().items():
                        self.states[bid].update_factors(a, g)
                    self.counters["stats_updates"] += 1
            results, changed_here, refreshed = self._precondition_owned(t, stats_now, damping)
            writer = self._local_exchange if self.replicated else self.exchange
            writer.scatter_blocks(self.block_index, self.owner_of, results)
            changed = self.exchange.any_true(changed_here)
            if method != "kfac" and stats_now:
                self.counters["stats_updates"] += 1
            if self.exchange.any_true(refreshed):
                self.counters["curvature_refreshes"] += 1
                self.last_refresh_step = t
            if changed:
                self.counters["preconditioned_steps"] += 1
            return changed
        finally:
            self._acc.clear()
            self._ran.clear()
            self.counters["optimizer_steps"] = t + 1
            self._stats_now = self.schedule.stats_due(t + 1)

    def _precondition_owned(self, t: int, stats_now: bool, damping: float) -> tuple[dict, bool, bool]:
        """Update, refresh and apply this rank's blocks: (results to scatter, any changed, any refreshed)."""
        c = self.cfg
        reader = self._local_exchange if self.replicated else self.exchange
        vecs = reader.gather_blocks(self.block_index, self.owner_of)
        scale = self.access.grad_scale()
        dtype = torch.float64 if c.numerics.inverse_dtype == "float64" else torch.float32
        results: dict[str, torch.Tensor] = {}
        changed = False
        refreshed = False
        by_id = {b.block_id: b for b in self.blocks}
        work, due = [], []
        present = [bid for bid in self.states if vecs.get(bid) is not None]
        # An exactly-zero gradient is an unused layer: DDP leaves None where ZeRO and FSDP2
        # materialise zeros, and both must leave the block's statistics and grafting state alone.
        # One host sync for all blocks, not one per block.
        nonzero = torch.stack([vecs[b].abs().amax() for b in present]).tolist() if present else []
        for bid, peak in zip(present, nonzero, strict=True):
            if peak == 0:
                continue
            state, vec = self.states[bid], vecs[bid]
            block = by_id[bid]
            mat = block.to_matrix(vec.float()) / scale
            work.append((bid, block, state, vec, mat))
            is_due = stats_now if c.method == "psgd" else self.schedule.refresh_due(t, bid)
            if is_due:
                due.append(bid)
            if self.owner_of[bid] != self.rank:
                continue  # a replica: its inverse arrives from the owner below
            if c.method == "shampoo" and stats_now:
                state.update_stats(mat)
            if is_due:
                before = self.schedule.probe_before_refresh(t, state, mat)  # sparse_interval=auto only
                if c.method == "psgd":
                    ok = state.fit(mat, damping, c.psgd.fit_iterations)
                else:
                    ok = state.refresh(damping, dtype, c.numerics.retry_float64)
                refreshed |= ok
                self._count_refresh(bid, ok)
                if ok:
                    self.schedule.after_refresh(bid, t, state, mat, before)
        if self.replicated and due:
            self._broadcast_inverses(due, by_id)
        outs = {bid: block.from_matrix(state.precondition(mat) * scale) for bid, block, state, _, mat in work
                if state.ready}
        finite = torch.stack([torch.isfinite(o).all() for o in outs.values()]).tolist() if outs else []
        finite_of = dict(zip(outs, finite, strict=True))
        for bid, _, _, vec, _ in work:
            if finite_of.get(bid, False):
                results[bid] = outs[bid]
                changed = True
                self.block_preconditioned[bid] = self.block_preconditioned.get(bid, 0) + 1
                continue
            if bid in outs:
                log.warning("step %d: block %s produced a non-finite update; gradient left as is", t, bid)
            results[bid] = vec
        return results, changed, refreshed

    _INVERSE_FIELDS = {"kfac": ("g_inv", "a_inv"), "shampoo": ("left_root", "right_root"), "psgd": ("ql", "qr")}

    def _broadcast_inverses(self, due: list[str], by_id: dict[str, MatrixBlock]) -> None:
        """Copy each refreshed block's inverse pair from its owner to every rank (replicated mode)."""
        fields = self._INVERSE_FIELDS[self.cfg.method]
        device = self._device()
        tensors, owners = {}, {}
        for bid in due:
            state, block = self.states[bid], by_id[bid]
            dims = {fields[0]: block.rows, fields[1]: block.cols}
            for f in fields:
                value = getattr(state, f)
                tensors[f"{bid}/{f}"] = (
                    value.clone() if value is not None else torch.zeros(dims[f], dims[f], device=device)
                )
                owners[f"{bid}/{f}"] = self.owner_of[bid]
            # A block whose owner has no inverse yet must not receive zeros as one.
            tensors[f"{bid}/valid"] = torch.tensor([float(state.ready)], device=device)
            owners[f"{bid}/valid"] = self.owner_of[bid]
        self.exchange.broadcast_from_owners(tensors, owners)
        for bid in due:
            if self.owner_of[bid] == self.rank or not bool(tensors[f"{bid}/valid"].item()):
                continue
            for f in fields:
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
        return "\n".join(lines)

    def curvature_bytes(self) -> int:
        """Bytes of factors, roots and inverses held by this rank."""
        return sum(s.nbytes() for s in self.states.values())

    def metrics(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.counters.items()}
        out["damping"] = self.last_damping
        t = self.counters["optimizer_steps"]
        out["steps_since_refresh"] = float(t - self.last_refresh_step) if self.last_refresh_step is not None else -1.0
        out["curvature_bytes"] = float(self.curvature_bytes())
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
            "blocks": {bid: s.state_dict() for bid, s in self.states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.cfg.method:
            raise ConfigError(
                f"checkpoint was written by method {state.get('method')!r}, config says {self.cfg.method!r}"
            )
        self.counters.update(state["counters"])
        self.last_refresh_step = state.get("last_refresh_step")
        self.block_refreshes = dict(state.get("block_refreshes", {}))
        self.block_preconditioned = dict(state.get("block_preconditioned", {}))
        for bid, sd in state["blocks"].items():
            if bid in self.states:
                self.states[bid].load_state_dict(sd)
        self._stats_now = self.schedule.stats_due(self.counters["optimizer_steps"])

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
