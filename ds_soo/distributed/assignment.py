"""Which rank owns which curvature block: deterministic LPT packing over a cost model.

A block's inverse (or inverse root) costs about ``sum(d**3)`` over its factor dims and its factors
take about ``sum(d**2)`` elements. Longest-processing-time-first greedily gives the next most
expensive block to the least loaded rank; it is within 4/3 of the optimal makespan and, with ties
broken by block id and rank, it is a pure function of its inputs: every rank computes the same
assignment without communicating, and a restart at the same world size reproduces it exactly.

``assign_blocks_local`` trades some of that balance for locality: it prefers as owner the rank
that already holds most of a block's gradient (a ZeRO-1/2 flat partition, an FSDP2 row shard), so
fewer gradient bytes travel to owners and back, as long as the busiest rank's load stays within
``slack`` times LPT's. It is deterministic in the same way.

With a grad-worker fraction (KAISA), a block is also *replicated* on the other ranks of its owner's
group of ``k = round(fraction * world)`` consecutive ranks: the owner computes the inverse, the group
stores it. Consecutive ranks keep that broadcast inside a node.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Strategy = Literal["lpt", "round_robin"]


@dataclass(frozen=True)
class BlockCost:
    """Cost of one block. ``weight`` scales compute only (e.g. a relative refresh frequency)."""

    dims: tuple[int, ...]
    weight: float = 1.0

    @property
    def compute(self) -> float:
        return self.weight * float(sum(d**3 for d in self.dims))

    @property
    def memory(self) -> int:
        return sum(d * d for d in self.dims)


@dataclass(frozen=True)
class Assignment:
    """Owner of every block and the per-rank load it produces (compute on owners, memory on groups)."""

    world_size: int
    owner: dict[str, int]
    groups: dict[str, tuple[int, ...]]
    compute: tuple[float, ...]
    memory: tuple[int, ...]
    # Sum over distinct blocks: what every rank would hold if all curvature were replicated (KAISA).
    total_memory: int
    # How the owners were chosen: "lpt", "round_robin", "locality", or "lpt (locality over bound)".
    strategy: str = "lpt"

    @property
    def imbalance(self) -> float:
        """max/mean inverse compute over ranks: 1.0 is perfect, world_size is everything on one rank."""
        return _max_over_mean(self.compute)

    @property
    def memory_imbalance(self) -> float:
        return _max_over_mean(self.memory)

    @property
    def idle_ranks(self) -> tuple[int, ...]:
        """Ranks that own no block: they compute no inverse and only send and receive gradients."""
        owners = set(self.owner.values())
        return tuple(r for r in range(self.world_size) if r not in owners)

    def blocks_of(self, rank: int) -> list[str]:
        return sorted(b for b, r in self.owner.items() if r == rank)

    def replicas_of(self, rank: int) -> list[str]:
        """Blocks whose inverse this rank stores (its own plus its group's)."""
        return sorted(b for b, g in self.groups.items() if rank in g)

    def summary(self) -> dict[str, float | int]:
        return {
            "world_size": self.world_size,
            "blocks": len(self.owner),
            "imbalance": self.imbalance,
            "memory_imbalance": self.memory_imbalance,
            "max_memory": max(self.memory, default=0),
            "total_memory": self.total_memory,
            "idle_ranks": len(self.idle_ranks),
        }


def _max_over_mean(values: Sequence[float]) -> float:
    if not values:
        return 1.0
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else 1.0


def group_size(world_size: int, grad_worker_fraction: float | None) -> int:
    """Ranks per replication group; ``None`` means one (owner only). Must divide the world size."""
    if grad_worker_fraction is None:
        return 1
    if not 0.0 < grad_worker_fraction <= 1.0:
        raise ValueError(f"grad_worker_fraction must be in (0, 1], got {grad_worker_fraction}")
    k = min(world_size, max(1, round(grad_worker_fraction * world_size)))
    if world_size % k:
        raise ValueError(
            f"grad_worker_fraction={grad_worker_fraction} gives groups of {k} ranks, "
            f"which does not divide world_size={world_size}"
        )
    return k


def _as_cost(spec: BlockCost | Sequence[int] | tuple[Sequence[int], float]) -> BlockCost:
    if isinstance(spec, BlockCost):
        return spec
    if len(spec) == 2 and isinstance(spec[0], (list, tuple)):
        dims, weight = spec
        return BlockCost(tuple(int(d) for d in dims), float(weight))
    return BlockCost(tuple(int(d) for d in spec))


def assign_blocks(
    blocks: Mapping[str, BlockCost | Sequence[int] | tuple[Sequence[int], float]],
    world_size: int,
    grad_worker_fraction: float | None = None,
    strategy: Strategy = "lpt",
) -> Assignment:
    """Assign every block an owner rank (and a replication group).

    ``blocks`` maps a block id to a :class:`BlockCost`, a list of factor dims, or ``(dims, weight)``.
    ``round_robin`` (sorted by id) exists as the naive baseline the LPT balance is measured against.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    costs = {str(b): _as_cost(s) for b, s in blocks.items()}
    k = group_size(world_size, grad_worker_fraction)
    compute = [0.0] * world_size
    owner: dict[str, int] = {}
    if strategy == "round_robin":
        for i, b in enumerate(sorted(costs)):
            owner[b] = i % world_size
            compute[owner[b]] += costs[b].compute
    elif strategy == "lpt":
        # Heap of (compute load, memory load, rank): the least loaded rank, ties to less memory, then lower rank.
        mem_load = [0] * world_size
        heap = [(0.0, 0, r) for r in range(world_size)]
        for b in sorted(costs, key=lambda b: (-costs[b].compute, -costs[b].memory, b)):
            load, mem, r = heapq.heappop(heap)
            owner[b] = r
            compute[r] = load + costs[b].compute
            mem_load[r] = mem + costs[b].memory
            heapq.heappush(heap, (compute[r], mem_load[r], r))
    else:
        raise ValueError(f"strategy must be 'lpt' or 'round_robin', got {strategy!r}")

    return _finish(costs, owner, compute, world_size, k, strategy)


def _finish(
    costs: dict[str, BlockCost], owner: dict[str, int], compute: list[float], world_size: int, k: int, strategy: str
) -> Assignment:
    groups = {b: tuple(range(r - r % k, r - r % k + k)) for b, r in owner.items()}
    memory = [0] * world_size
    for b, g in groups.items():
        for r in g:
            memory[r] += costs[b].memory
    total = sum(c.memory for c in costs.values())
    return Assignment(world_size, owner, groups, tuple(compute), tuple(memory), total, strategy)


def assign_blocks_local(
    blocks: Mapping[str, BlockCost | Sequence[int] | tuple[Sequence[int], float]],
    held: Mapping[str, Sequence[float]],
    world_size: int,
    slack: float = 1.10,
    grad_worker_fraction: float | None = None,
) -> Assignment:
    """Owners that already hold most of each block's gradient, within ``slack`` x LPT's busiest rank.

    ``held[block][r]`` is how much of the block's gradient rank ``r`` holds (bytes or elements; only
    the comparison between ranks matters), e.g. from :func:`held_elements`. Blocks go in LPT order
    (most expensive first, ties by id); each goes to the rank holding most of it (ties: less loaded,
    then lower rank) whose load stays within the cap ``slack * max(LPT loads)``, else to the least
    loaded rank, as LPT would. If that greedy pass still ends above the cap, LPT's own assignment is
    returned instead (``strategy`` says which), so the max/mean load is never worse than
    ``slack`` times LPT's. A pure function of its inputs, like :func:`assign_blocks`.
    """
    if slack < 1.0:
        raise ValueError(f"slack must be >= 1.0 (a bound relative to LPT's max load), got {slack}")
    costs = {str(b): _as_cost(s) for b, s in blocks.items()}
    missing = sorted(set(costs) - set(map(str, held)))
    if missing:
        raise ValueError(f"held has no entry for blocks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    bad = sorted(b for b in costs if len(held[b]) != world_size)
    if bad:
        raise ValueError(f"held[block] must list one amount per rank ({world_size}); wrong length for {bad[:5]}")
    lpt = assign_blocks(costs, world_size, grad_worker_fraction)
    cap = slack * max(lpt.compute, default=0.0)
    k = group_size(world_size, grad_worker_fraction)
    compute = [0.0] * world_size
    owner: dict[str, int] = {}
    for b in sorted(costs, key=lambda b: (-costs[b].compute, -costs[b].memory, b)):
        c = costs[b].compute
        prefs = sorted(range(world_size), key=lambda r: (-held[b][r], compute[r], r))
        fits = [r for r in prefs if held[b][r] > 0 and compute[r] + c <= cap * (1 + 1e-12)]
        r = fits[0] if fits else min(range(world_size), key=lambda r: (compute[r], r))
        owner[b] = r
        compute[r] += c
    if max(compute, default=0.0) > cap * (1 + 1e-12):
        return _finish(costs, dict(lpt.owner), list(lpt.compute), world_size, k, "lpt (locality over bound)")
    return _finish(costs, owner, compute, world_size, k, "locality")


def held_elements(
    block_index: Mapping[str, Sequence[tuple[str, object]]],
    layouts: Mapping[str, object],
    world_size: int,
    ranges: str = "held",
) -> dict[str, list[int]]:
    """Per block, how many of its gradient elements each rank holds (``ranges="held"``) or provides.

    ``block_index`` maps a block id to ``(param_name, flat_indices)`` pieces (an integer tensor, 1-D or
    2-D, of positions in the parameter's flattened true shape) and ``layouts`` maps names to
    :class:`~ds_soo.distributed.layout.ParamLayout`; counting needs nothing but the index ranges.
    """
    if ranges not in ("held", "provided"):
        raise ValueError(f"ranges must be 'held' or 'provided', got {ranges!r}")
    out: dict[str, list[int]] = {}
    for bid, pieces in block_index.items():
        counts = [0] * world_size
        for name, idx in pieces:
            spans = getattr(layouts[name], ranges)
            for r, (s, e) in enumerate(spans):
                if e > s:
                    counts[r] += int(((idx >= s) & (idx < e)).sum())
        out[bid] = counts
    return out
