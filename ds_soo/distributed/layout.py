"""Where each parameter's averaged gradient lives on each rank, independent of the engine.

A parameter is addressed by its flattened index space ``[0, numel)`` of its *true* shape (``ds_shape``
under ZeRO-3). Each rank ``r`` *provides* the disjoint flat range ``provided[r]`` of the averaged
gradient (the ranges cover the parameter once) and *holds* the range ``held[r]`` that it stores and
must receive back after preconditioning. DDP and ZeRO-0 hold everything; ZeRO-1/2/3 and FSDP2 hold
exactly what they provide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

Range = tuple[int, int]


@dataclass(frozen=True)
class ParamLayout:
    name: str
    shape: tuple[int, ...]
    provided: tuple[Range, ...]
    held: tuple[Range, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @staticmethod
    def replicated(name: str, shape: tuple[int, ...], world_size: int) -> ParamLayout:
        """Every rank holds the full gradient (DDP, ZeRO-0); rank r provides an even slice of it."""
        numel = 1
        for s in shape:
            numel *= s
        bounds = [numel * r // world_size for r in range(world_size + 1)]
        provided = tuple((bounds[r], bounds[r + 1]) for r in range(world_size))
        return ParamLayout(name, tuple(shape), provided, tuple((0, numel) for _ in range(world_size)))


class GradientAccess(Protocol):
    """One adapter per engine implements this; the preconditioner sees nothing else of the engine."""

    rank: int
    world_size: int

    def param_layouts(self) -> dict[str, ParamLayout]:
        """Layouts of every trainable parameter, keyed by the model's parameter name."""
        ...

    def local_grad(self, name: str) -> torch.Tensor | None:
        """Writable 1-D view of this rank's ``held`` range of the averaged gradient (None: no gradient)."""
        ...

    def local_param(self, name: str) -> torch.Tensor | None:
        """1-D view of this rank's ``held`` range of the parameter itself, in the same positions as
        ``local_grad`` (read only: the damping rule measures the step the base optimizer took)."""
        ...

    def grad_scale(self) -> float:
        """Loss scale still applied to the gradients (1.0 unless fp16 loss scaling is active)."""
        ...


def writable_flat(grad: torch.Tensor, what: str) -> torch.Tensor:
    """A 1-D view that writes through to ``grad``: preconditioned values must land in the engine's tensor."""
    if not grad.is_contiguous():
        raise RuntimeError(f"{what} is not contiguous, so no flat view of it can be written")
    return grad.view(-1)


class LocalGradientAccess:
    """Single process: the full ``.grad`` of each parameter."""

    rank = 0
    world_size = 1

    def __init__(self, named_params: dict[str, torch.nn.Parameter]):
        self._params = named_params

    def param_layouts(self) -> dict[str, ParamLayout]:
        return {n: ParamLayout.replicated(n, tuple(p.shape), 1) for n, p in self._params.items()}

    def local_grad(self, name: str) -> torch.Tensor | None:
        g = self._params[name].grad
        return None if g is None else writable_flat(g, f"{name}: .grad")

    def raw_grad(self, name: str) -> torch.Tensor | None:
        """The ``.grad`` itself, in the parameter's shape (batched and fused ops need no flat view)."""
        return self._params[name].grad

    def local_param(self, name: str) -> torch.Tensor | None:
        return self._params[name].detach().reshape(-1)

    def grad_scale(self) -> float:
        return 1.0
