"""Which step of a refresh interval each block refreshes on, so that no step carries a spike.

Refreshing every block on the same step makes that step pay for the whole inverse work at once.
Spreading the blocks over the ``interval`` steps of a window is a packing problem, solved here by
longest-processing-time first: the largest block goes into the least loaded step. A step then costs at
most the largest single block's refresh plus an even share of the rest.

The plan depends only on the block ids and their costs, not on ranks or owners: every rank computes
the same plan, and a run refreshes each block on the same steps at any world size, so a distributed
run keeps matching a single-process run of the same global batch (and a resumed run at another world
size keeps its schedule). Each owner's blocks sit on steps of an evenly loaded global plan, so no
rank's step can cost more than that step's global load.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping


def stagger_offsets(costs: Mapping[str, float], interval: int) -> dict[str, int]:
    """Each block's offset in ``[0, interval)``: LPT packing of block costs into the interval's steps.

    Equal loads go to the lowest step and blocks of equal cost are taken in id order, so the result is
    deterministic.
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    slots = [(0.0, s) for s in range(interval)]  # (load, step): already a heap
    offsets: dict[str, int] = {}
    for block_id in sorted(costs, key=lambda b: (-float(costs[b]), b)):
        load, slot = heapq.heappop(slots)
        offsets[block_id] = slot
        heapq.heappush(slots, (load + float(costs[block_id]), slot))
    return offsets


def peak_over_even(costs: Mapping[str, float], offsets: Mapping[str, int], interval: int) -> float:
    """The busiest step's load against an even spread (total / interval, or the largest block if more).

    1.0 is the best any plan can do; refreshing every block on one step gives up to ``interval``.
    """
    load = [0.0] * interval
    for block_id, cost in costs.items():
        load[offsets[block_id] % interval] += float(cost)
    bound = max(sum(load) / interval, max(map(float, costs.values()), default=0.0))
    return max(load) / bound if bound > 0 else 1.0
