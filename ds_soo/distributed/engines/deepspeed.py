"""DeepSpeed ZeRO 0/1/2/3: where each rank's piece of the averaged gradient lives between
``engine.backward(loss)`` at the accumulation boundary and ``engine.step()``.

Read from DeepSpeed 0.19's source (``runtime/zero/stage_1_and_2.py``, ``runtime/zero/stage3.py``,
``utils/tensor_fragment.py``, ``utils/mixed_precision_linkage.py``):

- **Stage 0**: ``p.grad`` is the full averaged gradient on every rank (also with bf16, whose
  FP16_UnfusedOptimizer keeps bf16 grads there).
- **Stages 1/2**: ``p.grad`` is cleared. At the boundary ``optimizer.averaged_gradients[group]`` is a
  list of this rank's partition pieces (views of each param's reduced grad or, with bf16 params and
  fp32 accumulation, of one flat fp32 buffer); ``step()`` flattens that list, so in-place writes to
  its entries are what the optimizer applies. ``p._hp_mapping`` (None when the param is not in this
  rank's partition) gives ``lp_fragment_address`` (start, numel in the flattened param) and
  ``get_lp_grad_fragment(p._index_in_param_group)`` returns that list entry. That is exactly the
  path of ``safe_get_full_grad``/``safe_set_full_grad`` minus their per-parameter all_reduce.
- **Stage 3**: the true shape is ``p.ds_shape`` (``p.shape`` is ``(0,)``). Rank r holds flat range
  ``[r*c, min((r+1)*c, ds_numel))`` with ``c = p.partition_numel() = ceil(ds_numel/world)``; the
  gradient partition is ``optimizer._get_fp32_grad_state_partition(p)`` (a narrow of
  ``grad_partitions_flat_buffer``, or of the fp32 partition's ``.grad`` under optimizer offload),
  which ``step()`` flattens from ``averaged_gradients``.

- **ZeRO-1 with bf16 params and fp32 gradient accumulation** runs ``BF16_Optimizer``: the same
  ``_hp_mapping`` path, but each list entry is the param's *full* fp32 gradient, so the fragment is
  narrowed to ``lp_fragment_address``.

:class:`DeepSpeedOracleAccess` is the slow, public-API version (``safe_get_full_grad`` /
``safe_set_full_grad``, one collective per parameter) used as a test oracle and fallback. Two
DeepSpeed 0.19.8 defects it works around: ZeRO-3 ``safe_set_full_grad`` fails on the last rank when
numel is not a multiple of the world size, and under BF16_Optimizer ``safe_set_full_grad`` writes
the bf16 ``p.grad`` that neither ``safe_get_full_grad`` nor ``step()`` reads.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ds_soo.distributed.engines import nonfinite_anywhere
from ds_soo.distributed.layout import ParamLayout

log = logging.getLogger(__name__)


def _zero_optimizer(engine: Any) -> Any:
    return engine.optimizer


def _zero0_fp16_loss_unscaled(engine: Any) -> bool:
    """Whether this engine's ZeRO-0 fp16 backward leaves the loss unscaled (DeepSpeed 0.19.x).

    ``DeepSpeedEngine.backward`` there scales the loss only for a ``ZeROOptimizer``; the ZeRO-0
    FP16_Optimizer/FP16_UnfusedOptimizer are not one, so ``.grad`` holds unscaled gradients while their
    ``step()`` still divides by the loss scale. Measured on CUDA: the update is the gradient / scale.
    Older engines passed the loss through ``optimizer.backward``, which scaled it.
    """
    if int(engine.zero_optimization_stage()) != 0:
        return False
    try:
        from deepspeed.runtime.base_optimizer import ZeROOptimizer
    except ImportError:
        return False
    if isinstance(_zero_optimizer(engine), ZeROOptimizer):
        return False
    src = inspect.getsource(type(engine).backward)
    return "self.optimizer.backward(" not in src


def engine_grad_scale(engine: Any) -> float:
    """fp16 dynamic/static loss scale still applied to the gradients; 1.0 for fp32 and bf16."""
    if not (hasattr(engine, "fp16_enabled") and engine.fp16_enabled()):
        return 1.0
    if _zero0_fp16_loss_unscaled(engine):
        if not getattr(engine, "_ds_soo_warned_fp16", False):
            log.warning(
                "DeepSpeed ZeRO-0 fp16: engine.backward does not scale the loss but step() divides by the "
                "loss scale, so every update is loss_scale times too small (a DeepSpeed defect, not ds_soo's)"
            )
            engine._ds_soo_warned_fp16 = True
        return 1.0
    opt = _zero_optimizer(engine)
    for attr in ("loss_scale", "cur_scale"):
        v = getattr(opt, attr, None)
        if v is not None:
            return float(v)
    scaler = getattr(opt, "loss_scaler", None)
    return float(scaler.cur_scale) if scaler is not None else 1.0


def _stage12_fragment(p: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's averaged-gradient fragment of ``p`` under ZeRO-1/2 (or BF16_Optimizer), writable."""
    hm = getattr(p, "_hp_mapping", None)
    if hm is None:
        return None
    frag = hm.get_lp_grad_fragment(p._index_in_param_group)  # ValueError off the boundary
    a = hm.lp_fragment_address
    flat = frag.view(-1)
    if flat.numel() != a.numel:  # a full-param accumulation buffer (BF16_Optimizer): this rank's part
        flat = flat.narrow(0, a.start, a.numel)
    return flat


class DeepSpeedGradientAccess:
    """Direct, collective-free access to each rank's averaged-gradient fragments (ZeRO 0/1/2/3).

    Construction is collective for stages 1/2 (one ``all_gather_object`` of the fragment ranges,
    which are fixed for the engine's lifetime): build it on every rank at the same point.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        opt = _zero_optimizer(engine)
        self.group = getattr(opt, "dp_process_group", None) if self.stage > 0 else None
        if self.stage == 0:
            self.group = getattr(engine, "seq_data_parallel_group", None)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        self.device = torch.device(engine.device) if hasattr(engine, "device") else torch.device("cpu")
        if self.stage == 0:
            self._layouts = {
                n: ParamLayout.replicated(n, tuple(p.shape), self.world_size) for n, p in self._params.items()
            }
        elif self.stage in (1, 2):
            self._layouts = self._stage12_layouts()
        elif self.stage == 3:
            self._layouts = self._stage3_layouts()
            # ZeRO-3 re-applies the previous step's partition of a parameter that got no gradient.
            self.stale_unused_grads = True
            # Its module backward hooks gather and release parameters: no extra (MC-Fisher) backward.
            self.mc_backward_safe = False
        else:
            raise NotImplementedError(f"ZeRO stage {self.stage}")

    # -------------------------------------------------------------- layouts
    def _stage12_layouts(self) -> dict[str, ParamLayout]:
        groups = getattr(_zero_optimizer(self.engine), "real_dp_process_group", [])
        if any(g is not self.group for g in groups):
            raise NotImplementedError("ZeRO-1/2 with per-group process groups (MoE experts) is not supported")
        mine: dict[str, tuple[int, int]] = {}
        for n, p in self._params.items():
            hm = getattr(p, "_hp_mapping", None)
            if hm is not None:
                a = hm.lp_fragment_address
                mine[n] = (int(a.start), int(a.start + a.numel))
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        layouts = {}
        for n, p in self._params.items():
            ranges = tuple(everyone[r].get(n, (0, 0)) for r in range(self.world_size))
            layout = ParamLayout(n, tuple(p.shape), ranges, ranges)
            covered = sorted(r for r in ranges if r[1] > r[0])
            pos = 0
            for s, e in covered:
                if s != pos:
                    raise RuntimeError(f"{n}: ZeRO fragments {ranges} do not tile [0, {layout.numel})")
                pos = e
            if pos != layout.numel:
                raise RuntimeError(f"{n}: ZeRO fragments {ranges} do not tile [0, {layout.numel})")
            layouts[n] = layout
        return layouts

    def _stage3_layouts(self) -> dict[str, ParamLayout]:
        opt = _zero_optimizer(self.engine)
        layouts = {}
        for n, p in self._params.items():
            group = opt._get_param_partition_group(p)
            if dist.get_world_size(group) != self.world_size:
                raise NotImplementedError(f"{n}: ZeRO-3 partition group differs from the data-parallel group")
            numel, chunk = int(p.ds_numel), int(p.partition_numel())
            ranges = tuple((min(r * chunk, numel), min((r + 1) * chunk, numel)) for r in range(self.world_size))
            layouts[n] = ParamLayout(n, tuple(p.ds_shape), ranges, ranges)
        return layouts

    # -------------------------------------------------------------- GradientAccess
    def param_layouts(self) -> dict[str, ParamLayout]:
        return dict(self._layouts)

    def local_grad(self, name: str) -> torch.Tensor | None:
        p = self._params[name]
        if self.stage == 0:
            return None if p.grad is None else p.grad.view(-1)
        if self.stage in (1, 2):
            return _stage12_fragment(p)
        opt = _zero_optimizer(self.engine)
        group_idx = opt.grad_position[opt.get_param_id(p)][0]
        if opt._swappable_optimizer_subgroup(group_idx):
            raise NotImplementedError("ZeRO-3 NVMe optimizer offload: use DeepSpeedOracleAccess")
        part, _ = opt._get_fp32_grad_state_partition(p, release_swap_buffers=False)
        s, e = self._layouts[name].held[self.rank]
        return part.view(-1).narrow(0, 0, e - s)

    def local_param(self, name: str) -> torch.Tensor | None:
        """The weights as the engine's module holds them: full under ZeRO-0/1/2 (this rank's held range
        of them), this rank's partition under ZeRO-3."""
        p = self._params[name]
        s, e = self._layouts[name].held[self.rank]
        if self.stage == 3:
            return p.ds_tensor.detach().reshape(-1).narrow(0, 0, e - s)
        return p.detach().reshape(-1).narrow(0, s, e - s)

    def grad_scale(self) -> float:
        return engine_grad_scale(self.engine)

    def at_boundary(self) -> bool:
        return bool(self.engine.is_gradient_accumulation_boundary())

    def has_overflow(self) -> bool:
        """Whether any rank holds a non-finite gradient, i.e. whether fp16 ``step()`` will be skipped.

        Collective (one all_reduce). Call it before preconditioning so that a skipped step updates
        no curvature and writes nothing.
        """
        return nonfinite_anywhere(self, self.group)


class DeepSpeedOracleAccess:
    """Every rank holds a full copy of every gradient, read and written via DeepSpeed's public API.

    Slow (one collective per parameter each way) but independent of ZeRO internals. Use it as::

        with access.session():
            ... gather / precondition / scatter on access ...

    which loads all full gradients on entry and writes them back with ``safe_set_full_grad`` on exit.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        stage = int(engine.zero_optimization_stage())
        opt = _zero_optimizer(engine)
        self.group = getattr(opt, "dp_process_group", None) if stage > 0 else None
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        self.device = torch.device(engine.device) if hasattr(engine, "device") else torch.device("cpu")
        self._shapes = {n: tuple(getattr(p, "ds_shape", None) or p.shape) for n, p in self._params.items()}
        self._full: dict[str, torch.Tensor | None] | None = None

    def param_layouts(self) -> dict[str, ParamLayout]:
        return {n: ParamLayout.replicated(n, s, self.world_size) for n, s in self._shapes.items()}

    def load(self) -> None:
        from deepspeed.utils import safe_get_full_grad

        self._full = {}
        for n in sorted(self._params):  # same order on every rank: each call is a collective
            g = safe_get_full_grad(self._params[n])
            self._full[n] = None if g is None else g.detach().clone().reshape(-1)

    def store(self) -> None:
        from deepspeed.utils import safe_set_full_grad

        if self._full is None:
            raise RuntimeError("store() without load()")
        for n in sorted(self._params):
            g, p = self._full[n], self._params[n]
            if g is None:
                continue
            if getattr(p, "_hp_grad", None) is not None:
                # BF16_Optimizer (ZeRO-1, bf16 params, fp32 accumulation): safe_set_full_grad writes
                # the bf16 p.grad, but safe_get_full_grad and step() use the fp32 buffer, and
                # set_full_hp_grad cannot write a fragment of that full-size buffer. Write it here.
                frag = _stage12_fragment(p)
                if frag is not None:
                    a = p._hp_mapping.lp_fragment_address
                    frag.copy_(g[a.start : a.start + a.numel])
            elif hasattr(p, "ds_id"):
                # DeepSpeed 0.19.8's ZeRO-3 set_fp32_grad_for_param narrows the flat value at
                # rank * partition_numel for partition_numel elements, which runs past the end on the
                # last rank unless numel divides by the world size: hand it a zero-padded value.
                padded = g.new_zeros(int(p.partition_numel()) * self.world_size)
                padded[: g.numel()] = g
                safe_set_full_grad(p, padded)
            else:
                safe_set_full_grad(p, g.view(self._shapes[n]))
        self._full = None

    @contextmanager
    def session(self) -> Iterator[DeepSpeedOracleAccess]:
        self.load()
        try:
            yield self
        finally:
            self.store()

    def local_param(self, name: str) -> torch.Tensor | None:
        """The full fp32 weights through DeepSpeed's public API (collective under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(self._params[name])
        return None if full is None else full.detach().reshape(-1)

    def local_grad(self, name: str) -> torch.Tensor | None:
        if self._full is None:
            raise RuntimeError("DeepSpeedOracleAccess: call load() (or use session()) first")
        return self._full[name]

    def grad_scale(self) -> float:
        return engine_grad_scale(self.engine)
