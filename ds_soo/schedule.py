"""When to gather curvature statistics and refresh inverses, and how much damping to use.

The research this project follows found that curvature needs frequent refreshes only early: a warm
phase (every ``warm_interval`` steps for the first ~0.3% of training; one epoch, about 2,500 iterations,
in its DeiT runs) followed by a sparse interval or a frozen preconditioner kept full accuracy, while
skipping the warm phase collapsed training. Statistics were gathered every 10 iterations throughout;
only the inverse refreshes became rare. It also found that the best damping grows with batch size and
learning rate.

``sparse_interval="auto"`` goes beyond the study: :class:`AutoInterval` lengthens each block's refresh
interval while its preconditioner stops changing and freezes the block once it stays still.
"""

from __future__ import annotations

import logging
import math
import statistics
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ds_soo.config import ConfigError, DampingConfig, ScheduleConfig
from ds_soo.stagger import peak_over_even, stagger_offsets

log = logging.getLogger(__name__)


@dataclass
class BlockInterval:
    """One block's adaptive refresh state (sparse phase only)."""

    interval: int
    next_due: int
    low_streak: int = 0
    frozen: bool = False
    refreshes: int = 0
    last_change: float | None = None
    changes: list[float] = field(default_factory=list)


@dataclass
class AutoInterval:
    """Per-block refresh intervals driven by how much each block's preconditioner still changes.

    ``observe`` is told, after every sparse-phase refresh of a block, the relative change
    ``|P_new g - P_old g| / |P_old g|`` of the block's preconditioned gradient ``g`` (the step's own
    gradient, so the change is measured where the update happens). Pure bookkeeping: no tensors kept.

    With statistics in an EMA, most of a refresh's change is sampling noise: it does not fall as
    training goes on, and refreshing sooner would only track that noise. So beyond the absolute
    thresholds, a change no larger than ``surprise`` times the block's usual change (the median of its
    last ``HISTORY`` changes) grows the interval too; only a change that stands out from that level
    (curvature that drifts grows its change with the interval) holds the interval, or halves it above
    ``shrink_above``. ``surprise=None`` keeps the absolute thresholds alone.

    Growth is additive by default (``growth="linear"``: one ``min_interval`` per refresh, so the
    interval grows like the square root of the steps since the start); the decrease is multiplicative.
    Doubling front-loads the sparse phase's refreshes and leaves the end of training with curvature
    hundreds of steps old, which in ``early_curvature`` cost more than the refreshes it saved.
    """

    min_interval: int
    max_interval: int
    grow_below: float
    shrink_above: float
    freeze_below: float
    freeze_patience: int
    start: int
    surprise: float | None = None
    growth: str = "linear"
    blocks: dict[str, BlockInterval] = field(default_factory=dict)

    @classmethod
    def from_config(cls, c: ScheduleConfig, start: int) -> AutoInterval:
        return cls(c.auto_min_interval, c.auto_max_interval, c.auto_grow_below, c.auto_shrink_above,
                   c.auto_freeze_below, c.auto_freeze_patience, start, c.auto_surprise, c.auto_growth)  # fmt: skip

    def _state(self, block_id: str) -> BlockInterval:
        if block_id not in self.blocks:
            # The block's first sparse-phase refresh (at the start, or its stagger offset after it).
            self.blocks[block_id] = BlockInterval(self.min_interval, self.start)
        return self.blocks[block_id]

    def due(self, block_id: str, step: int, offset: int = 0) -> bool:
        """``offset``: a staggered block's first sparse-phase refresh comes that many steps after the start."""
        b = self.blocks.get(block_id)
        if b is None:
            return step >= self.start + offset
        return not b.frozen and step >= b.next_due

    def observe(self, block_id: str, step: int, change: float | None) -> None:
        """Record a refresh at ``step`` and the change it made (None: not measurable, e.g. the first)."""
        b = self._state(block_id)
        b.refreshes += 1
        b.last_change = change
        if change is not None and math.isfinite(change):
            usual = self._usual_change(b)
            b.changes.append(change)
            if change < self.freeze_below:
                b.low_streak += 1
            else:
                b.low_streak = 0
            if b.low_streak >= self.freeze_patience:
                b.frozen = True
                log.info("block %s frozen at step %d: change %.3g below %g for %d refreshes in a row",
                         block_id, step, change, self.freeze_below, b.low_streak)  # fmt: skip
            else:
                b.interval = self._next_interval(b.interval, change, usual)
        b.next_due = step + b.interval

    HISTORY = 8

    def _usual_change(self, b: BlockInterval) -> float | None:
        """The median of the block's recent changes: its noise level (None without history or surprise)."""
        if self.surprise is None or not b.changes:
            return None
        return statistics.median(b.changes[-self.HISTORY :])

    def _next_interval(self, interval: int, change: float, usual: float | None) -> int:
        longer = interval + self.min_interval if self.growth == "linear" else 2 * interval
        grow, shrink = min(longer, self.max_interval), max(interval // 2, self.min_interval)
        if change < self.grow_below:
            return grow
        stands_out = usual is None or self.surprise is None or change > self.surprise * usual
        if change > self.shrink_above and stands_out:
            return shrink
        return grow if not stands_out else interval

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            bid: {
                "interval": b.interval,
                "frozen": b.frozen,
                "sparse_refreshes": b.refreshes,
                "last_change": b.last_change,
            }  # fmt: skip
            for bid, b in sorted(self.blocks.items())
        }

    def state_dict(self) -> dict[str, Any]:
        return {bid: asdict(b) for bid, b in self.blocks.items()}  # copies the lists too

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.blocks = {bid: BlockInterval(**fields) for bid, fields in state.items()}


def preconditioned_direction(state: Any, mat: torch.Tensor) -> torch.Tensor:
    """The block's preconditioner applied to ``mat`` without side effects (Shampoo: before grafting)."""
    fn = getattr(state, "raw_direction", None) or state.precondition
    return fn(mat)


@dataclass
class CurvatureSchedule:
    cfg: ScheduleConfig

    def __post_init__(self) -> None:
        self.warm_steps = self._resolve_warm_steps()
        self._stagger_costs: dict[str, float] = {}
        self._per_block = True  # False: refreshes are not per block (plan_stagger(None)), never staggered
        self._offsets: dict[int, dict[str, int]] = {}  # interval -> block id -> offset
        self.auto: AutoInterval | None = None
        if self.cfg.sparse_interval == "auto":
            # With an endless warm phase the auto policy never starts.
            self.auto = AutoInterval.from_config(self.cfg, self.warm_steps if self.warm_steps is not None else 0)

    def _resolve_warm_steps(self) -> int | None:
        c = self.cfg
        if c.warm_steps is not None:
            return c.warm_steps
        if c.warm_epochs is not None:
            if c.steps_per_epoch is None:
                raise ConfigError("schedule.steps_per_epoch must be set when schedule.warm_epochs is used")
            return self._floored(math.ceil(c.warm_epochs * c.steps_per_epoch), f"warm_epochs={c.warm_epochs:g}")
        if c.warm_fraction is not None:
            if c.total_steps is None:
                log.warning("schedule.total_steps unknown: the warm (frequent-refresh) phase never ends")
                return None
            derived = max(1, math.ceil(c.warm_fraction * c.total_steps))
            return self._floored(derived, f"warm_fraction={c.warm_fraction:g} of {c.total_steps} steps")
        return None

    def _floored(self, derived: int, what: str) -> int:
        """Raise a derived warm phase to ``warm_min_refreshes`` refreshes (capped at the run length)."""
        c = self.cfg
        floor = c.warm_min_refreshes * c.warm_interval
        if derived >= floor:
            return derived
        chosen = floor if c.total_steps is None else min(floor, c.total_steps)
        log.warning(
            "schedule: %s gives a warm phase of %d step(s), fewer than schedule.warm_min_refreshes=%d refreshes "
            "every %d steps; using %d warm steps%s",
            what, derived, c.warm_min_refreshes, c.warm_interval, chosen,
            " (the whole run)" if c.total_steps is not None and chosen == c.total_steps else "",
        )  # fmt: skip
        return chosen

    def in_warm_phase(self, step: int) -> bool:
        return self.warm_steps is None or step < self.warm_steps

    def staggers(self, warm: bool) -> bool:
        """Whether blocks refresh on their own steps in this phase (``stagger``: true, "sparse", false)."""
        mode = self.cfg.stagger if self._per_block else False
        return mode is True or (mode == "sparse" and not warm)

    def plan_stagger(self, costs: Mapping[str, float] | None) -> None:
        """Give staggered blocks cost-balanced offsets (see :mod:`ds_soo.stagger`).

        Without a plan (or for a block outside it) the offset is a hash of the block id: spread, but
        not balanced. ``None``: refreshes are not per block (PSGD fits every block on its statistics
        steps), so nothing is staggered."""
        self._per_block = costs is not None
        self._stagger_costs = {str(b): float(c) for b, c in (costs or {}).items()}
        self._offsets.clear()

    def _plan(self, interval: int) -> dict[str, int]:
        if interval not in self._offsets:
            self._offsets[interval] = plan = stagger_offsets(self._stagger_costs, interval)
            log.debug("schedule: stagger over %d steps, busiest step %.2fx the best spread", interval,
                      peak_over_even(self._stagger_costs, plan, interval))  # fmt: skip
        return self._offsets[interval]

    def _offset(self, block_id: str | None, interval: int, warm: bool) -> int:
        if not self.staggers(warm) or block_id is None or interval <= 1:
            return 0
        if block_id in self._stagger_costs:
            return self._plan(interval)[block_id]
        return zlib.crc32(block_id.encode()) % interval

    def _some_block_due(self, step: int, warm: bool) -> bool:
        """Whether any block refreshes at this step of a fixed-interval phase (statistics must be fresh)."""
        c = self.cfg
        interval = c.warm_interval if warm else c.sparse_interval
        since = step if warm else step - self.warm_steps
        if not self.staggers(warm) or interval <= 1:
            return since % interval == 0
        if not self._stagger_costs:
            return True  # offsets of unplanned blocks (hashes of their ids) are not known here: every step
        return since % interval in set(self._plan(interval).values())

    def refresh_due(self, step: int, block_id: str | None = None) -> bool:
        """Whether the block's inverse (root) is recomputed at this optimizer step (0-based)."""
        c = self.cfg
        if self.in_warm_phase(step):
            # The very first step always refreshes so that preconditioning starts at once.
            return step == 0 or (step - self._offset(block_id, c.warm_interval, True)) % c.warm_interval == 0
        if self.auto is not None:
            return self.auto.due(block_id or "", step, self._offset(block_id, c.auto_min_interval, False))
        if c.sparse_interval == 0:
            return False
        since = step - self.warm_steps
        return (since - self._offset(block_id, c.sparse_interval, False)) % c.sparse_interval == 0

    def stats_due(self, step: int) -> bool:
        """Whether statistics are gathered at this step (for any block)."""
        c = self.cfg
        if self.in_warm_phase(step):
            # Staggered: also on every step that refreshes some block, so that none uses stale factors.
            return step % c.stats_warm_interval == 0 or (self.staggers(True) and self._some_block_due(step, True))
        if c.sparse_interval == 0:
            return False  # frozen: statistics would never be used
        if self.auto is not None:
            # Each block's refresh step is its own; statistics arrive on a fixed grid so that every rank
            # agrees on the steps where they are reduced. A refresh off the grid uses the latest ones.
            return (step - self.warm_steps) % (c.stats_sparse_interval or c.auto_min_interval) == 0
        if c.stats_sparse_interval is not None:
            on_grid = (step - self.warm_steps) % c.stats_sparse_interval == 0
            # Refreshing more often than the grid: also on every refresh step, so none reuses stale factors.
            # Staggered blocks refresh off the grid: unless the grid is finer than their interval, they get
            # statistics of their own refresh step too (an equal grid would leave them 1..k-1 steps stale).
            finer = c.stats_sparse_interval < c.sparse_interval if self.staggers(False) else (
                c.stats_sparse_interval <= c.sparse_interval)
            return on_grid or (not finer and self._some_block_due(step, False))
        return self._some_block_due(step, False)

    # ----------------------------------------------------------------- sparse_interval="auto"
    def probe_before_refresh(self, step: int, state: Any, mat: torch.Tensor) -> torch.Tensor | None:
        """The block's current direction before a refresh, when the auto policy needs its change."""
        if self.auto is None or self.in_warm_phase(step) or not state.ready:
            return None
        return preconditioned_direction(state, mat)

    def after_refresh(self, block_id: str, step: int, state: Any, mat: torch.Tensor, before: Any) -> None:
        """Tell the auto policy how much a successful refresh changed the block's direction."""
        if self.auto is None or self.in_warm_phase(step):
            return
        change = None
        if before is not None:
            after = preconditioned_direction(state, mat)
            change = float((after - before).norm() / before.norm().clamp_min(1e-30))
        self.auto.observe(block_id, step, change)

    def state_dict(self) -> dict:
        out: dict[str, Any] = {"warm_steps": self.warm_steps}
        if self.auto is not None:
            out["auto"] = self.auto.state_dict()
        return out


def damping_value(cfg: DampingConfig, default: float, step: int) -> float:
    """rho for this step: constant, batch/lr-scaled relative to (B0, lr0), or a user callable."""
    base = default if cfg.value is None else cfg.value
    if cfg.kind in ("constant", "adaptive"):
        return base  # adaptive: the starting value (the preconditioner's LevenbergMarquardt holds the current one)
    if cfg.kind == "scaled":
        if cfg.batch_size is None or cfg.lr is None:
            # Silently dropping the scaling would train with the reference damping: refuse instead.
            raise ConfigError("damping.batch_size and damping.lr must be set when damping.kind is 'scaled'")
        factor = (cfg.batch_size / cfg.ref_batch_size) ** cfg.batch_exponent
        factor *= (cfg.lr / cfg.ref_lr) ** cfg.lr_exponent
        return base * factor
    assert cfg.fn is not None
    return float(cfg.fn(step, cfg.batch_size or 0.0, cfg.lr or 0.0))
