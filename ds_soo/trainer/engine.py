"""The boundary between the training loop and whatever runs the model: one process, DDP, FSDP2 or
DeepSpeed (ZeRO 0-3).

The loop only ever calls :meth:`EngineLoop.micro_step` (around each micro-batch's forward and
backward), :meth:`EngineLoop.backward`, :meth:`EngineLoop.step` and :meth:`EngineLoop.zero_grad`, so
a distributed engine replaces exactly those plus :meth:`EngineLoop.wrap`; :meth:`EngineLoop.shard`
(this rank's part of the global batch), :meth:`EngineLoop.reduce_mean` (global logged values),
:meth:`EngineLoop.gather` and :attr:`EngineLoop.is_main` (who writes files) are the other rank-aware
points, and :meth:`EngineLoop.save_state` / :meth:`EngineLoop.load_state` hold each engine's own
checkpoint format. Register an engine in :data:`ENGINES` under its ``train.engine`` name.

Order matters and is fixed here: the preconditioner is built on the module the engine will run (after
wrapping), and it runs after the last backward of a step and before the base optimizer, as the design
requires. Every engine sees the same *global* batch each step and takes an equal part of every
micro-batch, so a run at any world size trains the same model as one process (up to fp32 summation).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_soo.config import ConfigError
from ds_soo.trainer import report

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
PreconditionerFactory = Callable[[Any], Any]
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
DS_SOO_SUBDIR = "ds_soo"
DCP_SUBDIR = "model_optim"
DEEPSPEED_TAG = "deepspeed"


@dataclass
class DistInfo:
    """Where this process sits: rank, world, local rank and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None


@dataclass
class EngineOptions:
    """Engine-specific settings that are not part of every engine's signature."""

    find_unused_parameters: bool = False
    # engine=deepspeed: the finalized dict for deepspeed.initialize (see ds_soo.trainer.ds_config).
    ds_config: dict[str, Any] | None = None


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``auto`` = CUDA when present. A distributed rank always computes on ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and distributed:
        return torch.device("cuda", local_rank)
    return torch.device(name)


def launcher_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) when run directly."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _standalone_env() -> None:
    """Without a launcher, a distributed engine runs as world size 1 on a private local rendezvous."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _process_info(device_name: str, backend: str) -> DistInfo:
    _standalone_env()
    rank, world, local = launcher_world()
    device = resolve_device(device_name, local, distributed=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device, chosen)


class EngineLoop:
    """Single-process engine; subclasses override :meth:`wrap`, :meth:`backward` and :meth:`step`."""

    name = "single"
    distributed = False
    # False while resuming a run whose length changed: ds_soo then accepts another schedule.total_steps
    # (the trainer has checked every other field itself; see ds_soo.trainer.resume).
    resume_strict = True

    @classmethod
    def init_process(cls, device: str, backend: str = "auto") -> DistInfo:
        """Join the process group (distributed engines) and pick this rank's device."""
        _, world, _ = launcher_world()
        if world > 1:
            raise ConfigError(
                f"train.engine is 'single' but the launcher started {world} processes (WORLD_SIZE); "
                "use train.engine=ddp, fsdp2 or deepspeed"
            )
        return DistInfo(device=resolve_device(device))

    def __init__(
        self,
        model: nn.Module,
        make_optimizer: OptimizerFactory,
        make_preconditioner: PreconditionerFactory,
        device: torch.device | DistInfo,
        grad_accum: int = 1,
        bf16: bool = False,
        grad_clip: float = 0.0,
        options: EngineOptions | None = None,
    ) -> None:
        self.info = device if isinstance(device, DistInfo) else DistInfo(device=device)
        self.device = self.info.device
        self.grad_accum = grad_accum
        self.bf16 = bf16
        self.grad_clip = grad_clip
        self.options = options or EngineOptions()
        self._last_micro = True
        self.model, self.optimizer, self.preconditioner = self.wrap(model, make_optimizer, make_preconditioner)
        pre = self.preconditioner
        if pre is not None and not isinstance(self, DeepSpeedEngine):
            # Clipping belongs to the raw gradient, before preconditioning: the preconditioner does it
            # (attach() does the same with DeepSpeed's gradient_clipping).
            pre.set_hyperparams(grad_clip=grad_clip)
            pre.set_base_optimizer(self.optimizer)

    # -- where the model and optimizer get wrapped ------------------------------------------------
    def wrap(
        self, model: nn.Module, make_optimizer: OptimizerFactory, make_preconditioner: PreconditionerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """Place the model, then build the optimizer and the preconditioner (None for first order)."""
        model = model.to(self.device)
        optimizer = make_optimizer(model)
        return model, optimizer, make_preconditioner(model)

    @property
    def module(self) -> nn.Module:
        """The bare model (engines that wrap it return the inner module here)."""
        return self.model

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of the global batch: an equal slice of *each* micro-batch.

        Slicing per micro-batch (not the step's batch as a whole) keeps accumulation exact: micro-batch
        k on every rank is a part of global micro-batch k, whatever the world size.
        """
        world = self.world_size
        if world == 1:
            return batch
        n = next(iter(batch.values())).shape[0]
        if n % (self.grad_accum * world):
            raise ConfigError(
                f"train.batch_size ({n}) must be divisible by train.grad_accum ({self.grad_accum}) x world size "
                f"({world}): every rank gets an equal part of every micro-batch"
            )
        micro = n // self.grad_accum
        part = micro // world
        idx = torch.cat([torch.arange(k * micro + self.rank * part, k * micro + (self.rank + 1) * part)
                         for k in range(self.grad_accum)])  # fmt: skip
        return {k: v[idx] for k, v in batch.items()}

    # -- the calls of the loop ------------------------------------------------------------------
    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            yield

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward; ``last`` marks the step's final one."""
        self._last_micro = last
        yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss; gradients accumulate to the mean over the step."""
        (loss / self.grad_accum).backward()

    def step(self) -> bool:
        """Clip the raw gradient, precondition it, step the base optimizer.

        With a preconditioner the clip (``optim.grad_clip``) happens inside it, on the raw averaged
        gradient before preconditioning; first-order runs clip here. Returns whether the preconditioner
        changed the gradients. A step it skipped for non-finite gradients skips the base update too, so
        weights and optimizer state (momentum, Adam moments, step counts) stay exactly as they were.
        """
        pre = self.preconditioner
        if pre is None:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            return False
        groups = getattr(self.schedulable_optimizer, "param_groups", None)
        if groups:  # the lr of this update, for the damping rule and K-FAC's KL-clip
            pre.set_hyperparams(lr=groups[0]["lr"])
        changed = bool(pre.step())
        if getattr(pre, "last_step_skipped", False):
            return False
        self.optimizer.step()
        return changed

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def schedulable_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer whose param_groups' lr the learning-rate schedule sets."""
        return self.optimizer

    # -- rank-aware helpers ---------------------------------------------------------------------
    def reduce_mean(self, value: float) -> float:
        """Average a scalar over ranks (identity here) so logged losses are global."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (collective)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def param_sq_sum(self) -> float:
        """float64 sum of squares of all trainable parameters (full model, collective when sharded)."""
        return report.param_sq_sum(self.module)

    def param_fingerprints(self) -> dict[str, list[float]]:
        """Per-tensor [sum, sum of squares] of the full model (collective when sharded)."""
        return report.param_fingerprints(self.module)

    # -- checkpoints: model, optimizer and ds_soo state in this engine's format -------------------
    def save_state(self, path: Path) -> None:
        """Collective. Rank 0 writes model and optimizer (identical on every rank); ds_soo's state
        goes through ``ds_soo.checkpoint.save`` (DCP, one file per rank, when distributed)."""
        if self.is_main:
            torch.save(self.module.state_dict(), path / MODEL_FILE)
            torch.save(self.optimizer.state_dict(), path / OPTIMIZER_FILE)
        self._save_preconditioner(path)

    def load_state(self, path: Path) -> None:
        """Collective. Restore what :meth:`save_state` wrote, on every rank."""
        model_sd = torch.load(path / MODEL_FILE, map_location=self.device, weights_only=True)
        self.module.load_state_dict(model_sd)
        optim_sd = torch.load(path / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optim_sd)
        self._load_preconditioner(path)

    def _save_preconditioner(self, path: Path) -> None:
        if self.preconditioner is not None:
            from ds_soo import checkpoint

            checkpoint.save(self.preconditioner, path / DS_SOO_SUBDIR)

    def _load_preconditioner(self, path: Path) -> None:
        if self.preconditioner is None:
            return
        from ds_soo import checkpoint

        if checkpoint.checkpoint_format(path / DS_SOO_SUBDIR) is None:
            raise ConfigError(f"train.resume: {path} has no ds_soo state but this run preconditions")
        checkpoint.load(self.preconditioner, path / DS_SOO_SUBDIR, strict=self.resume_strict)


# ------------------------------------------------------------------------------------ torch.distributed
def init_torch_distributed(device: str, backend: str) -> DistInfo:
    """``init_process_group`` from the launcher's env:// variables (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    info = _process_info(device, backend)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": info.backend, "timeout": timedelta(minutes=30)}
        if info.device.type == "cuda":
            kwargs["device_id"] = info.device
        dist.init_process_group(**kwargs)
    info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    return info


class DDPEngine(EngineLoop):
    """DistributedDataParallel: full gradients on every rank, averaged by DDP during backward."""

    name = "ddp"
    distributed = True

    @classmethod
    def init_process(cls, device: str, backend: str = "auto") -> DistInfo:
        return init_torch_distributed(device, backend)

    def wrap(self, model, make_optimizer, make_preconditioner):
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(self.device)
        _canonical_grad_strides(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=self.options.find_unused_parameters
        )
        return ddp, make_optimizer(model), make_preconditioner(ddp)

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """No all-reduce until the last micro-batch: DDP reads the flag in forward, so it spans both."""
        self._last_micro = last
        if last:
            yield
        else:
            with self.model.no_sync():
                yield


def _canonical_grad_strides(model: nn.Module) -> None:
    """Give every gradient its parameter's strides before DDP copies it into a bucket.

    CPU conv backward returns the weight gradient of a one-input-channel conv (the ViT patch embedding
    on grayscale images) with stride 1 along that size-1 dimension, where the parameter has the
    canonical stride. Same memory layout, but DDP's reducer compares strides literally and warns
    ("Grad strides do not match bucket view strides") on every rank. Only parameters with a size-1
    dimension can differ this way, so only they get the (value-preserving) hook.
    """
    for p in model.parameters():
        if p.requires_grad and 1 in p.shape and p.is_contiguous():
            p.register_hook(_restride_to(p.stride()))


def _restride_to(stride: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    def fix(grad: torch.Tensor) -> torch.Tensor:
        return grad if grad.stride() == stride else grad.clone(memory_format=torch.contiguous_format)

    return fix


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """Every element of every ModuleList (the transformer blocks): FSDP2 gathers one block at a time."""
    return [unit for m in model.modules() if isinstance(m, nn.ModuleList) for unit in m]


class FSDP2Engine(EngineLoop):
    """``fully_shard`` per block, then the root: parameters and gradients are dim-0 DTensor shards.

    Every micro-batch's backward reduce-scatters its gradient (no ``set_requires_gradient_sync``):
    gradients then stay sharded between micro-batches, and the sum of averaged shards is the same mean.
    """

    name = "fsdp2"
    distributed = True

    @classmethod
    def init_process(cls, device: str, backend: str = "auto") -> DistInfo:
        return init_torch_distributed(device, backend)

    def wrap(self, model, make_optimizer, make_preconditioner):
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 kept it private
            from torch.distributed._composable.fsdp import fully_shard

        model = model.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for unit in sharding_units(model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, make_optimizer(model), make_preconditioner(model)

    def _reshard(self) -> None:
        """FSDP2 leaves the root unsharded after a forward (it expects a backward next); after an
        eval forward the root's parameters would be full tensors, so put every module back in shards."""
        from ds_soo.distributed.engines.fsdp2 import is_fsdp2

        for m in self.model.modules():
            if is_fsdp2(m):
                m.reshard()

    def param_sq_sum(self) -> float:
        import torch.distributed as dist

        self._reshard()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.model.parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                total += local.detach().double().pow(2).sum()
        dist.all_reduce(total)
        return float(total.item())

    def param_fingerprints(self) -> dict[str, list[float]]:
        import torch.distributed as dist

        self._reshard()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        sums = torch.zeros(len(named), 3, dtype=torch.float64, device=self.device)
        for i, (_, p) in enumerate(named):
            local = (p.to_local() if hasattr(p, "to_local") else p).detach().double()
            sums[i, 0], sums[i, 1], sums[i, 2] = local.sum(), local.pow(2).sum(), local.abs().sum()
        dist.all_reduce(sums)  # each entry is a sum over the tensor's elements, so shards add up
        return {n: row for (n, _), row in zip(named, sums.tolist(), strict=True)}

    def save_state(self, path: Path) -> None:
        """DCP: every rank writes its own shards of the model and the optimizer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self._reshard()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / DCP_SUBDIR))
        self._save_preconditioner(path)

    def load_state(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        self._reshard()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / DCP_SUBDIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self._load_preconditioner(path)


class DeepSpeedEngine(EngineLoop):
    """``deepspeed.initialize`` (ZeRO 0-3 from the ds_config) with ds_soo's ``attach()``.

    DeepSpeed wants ``engine.backward(loss); engine.step()`` on every micro-batch: it scales the loss by
    the accumulation steps, and its ``step()`` only updates at the accumulation boundary, which is where
    ``attach()`` preconditions. ``gradient_clipping`` clips the raw gradient: DeepSpeed's own clip for
    first-order runs, moved into the preconditioner (before preconditioning) by ``attach()`` otherwise.
    """

    name = "deepspeed"
    distributed = True

    @classmethod
    def init_process(cls, device: str, backend: str = "auto") -> DistInfo:
        import deepspeed
        import torch.distributed as dist

        info = _process_info(device, backend)
        deepspeed.init_distributed(dist_backend=info.backend, verbose=False)
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
        return info

    def wrap(self, model, make_optimizer, make_preconditioner):
        import deepspeed

        ds = self.options.ds_config
        if ds is None:
            raise ConfigError("train.engine=deepspeed needs a DeepSpeed config (train.ds_config or --deepspeed_config)")
        model = model.to(self.device)
        if "optimizer" in ds:
            params = [p for p in model.parameters() if p.requires_grad]
            engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
        else:
            engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=ds)
        return engine, engine.optimizer, make_preconditioner(engine)

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @property
    def schedulable_optimizer(self) -> torch.optim.Optimizer:
        # The ZeRO wrapper is no torch Optimizer; it shares the basic optimizer's param_groups.
        return self.model.basic_optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        if not self._last_micro:
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self) -> bool:
        pre = self.preconditioner
        before = pre.counters["preconditioned_steps"] if pre is not None else 0
        self.model.step()  # the boundary: attach() preconditions, then DeepSpeed clips and updates
        return pre is not None and pre.counters["preconditioned_steps"] > before

    def zero_grad(self) -> None:
        """DeepSpeed clears gradients itself after each boundary step."""

    def param_sq_sum(self) -> float:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.model.zero_optimization_stage() < 3:
            return report.param_sq_sum(self.module)
        from deepspeed import zero

        with zero.GatheredParameters(params):
            return report.param_sq_sum(self.module)

    def param_fingerprints(self) -> dict[str, list[float]]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.model.zero_optimization_stage() < 3:
            return report.param_fingerprints(self.module)
        from deepspeed import zero

        with zero.GatheredParameters(params):
            return report.param_fingerprints(self.module)

    def save_state(self, path: Path) -> None:
        if self.preconditioner is not None:
            from ds_soo.checkpoint import save_deepspeed

            save_deepspeed(self.model, path, tag=DEEPSPEED_TAG)
        else:
            self.model.save_checkpoint(str(path), tag=DEEPSPEED_TAG)

    def load_state(self, path: Path) -> None:
        if self.preconditioner is not None:
            from ds_soo.checkpoint import load_deepspeed

            load_path, _, _ = load_deepspeed(self.model, path, tag=DEEPSPEED_TAG, strict=self.resume_strict)
        else:
            load_path, _ = self.model.load_checkpoint(str(path), tag=DEEPSPEED_TAG)
        if load_path is None:
            raise ConfigError(f"train.resume: no DeepSpeed checkpoint under {path / DEEPSPEED_TAG}")


ENGINES: dict[str, type[EngineLoop]] = {
    "single": EngineLoop,
    "ddp": DDPEngine,
    "fsdp2": FSDP2Engine,
    "deepspeed": DeepSpeedEngine,
}
