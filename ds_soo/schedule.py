"""When to gather curvature statistics and refresh inverses, and how much damping to use.

The research this project follows found that curvature needs frequent refreshes only early: a warm
phase (every ``warm_interval`` steps for the first ~0.3% of training) followed by a sparse interval
or a frozen preconditioner kept full accuracy, while skipping the warm phase collapsed training.
It also found that the best damping grows with batch size and learning rate.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass

from ds_soo.config import ConfigError, DampingConfig, ScheduleConfig

log = logging.getLogger(__name__)


@dataclass
class CurvatureSchedule:
    cfg: ScheduleConfig

    def __post_init__(self) -> None:
        self.warm_steps = self._resolve_warm_steps()

    def _resolve_warm_steps(self) -> int | None:
        c = self.cfg
        if c.warm_steps is not None:
            return c.warm_steps
        if c.warm_epochs is not None:
            if c.steps_per_epoch is None:
                raise ConfigError("schedule.steps_per_epoch must be set when schedule.warm_epochs is used")
            return math.ceil(c.warm_epochs * c.steps_per_epoch)
        if c.warm_fraction is not None:
            if c.total_steps is None:
                log.warning("schedule.total_steps unknown: the warm (frequent-refresh) phase never ends")
                return None
            return max(1, math.ceil(c.warm_fraction * c.total_steps))
        return None

    def in_warm_phase(self, step: int) -> bool:
        return self.warm_steps is None or step < self.warm_steps

    def _offset(self, block_id: str | None, interval: int) -> int:
        if not self.cfg.stagger or block_id is None or interval <= 1:
            return 0
        return zlib.crc32(block_id.encode()) % interval

    def refresh_due(self, step: int, block_id: str | None = None) -> bool:
        """Whether the block's inverse (root) is recomputed at this optimizer step (0-based)."""
        c = self.cfg
        if self.in_warm_phase(step):
            # The very first step always refreshes so that preconditioning starts at once.
            return step == 0 or (step - self._offset(block_id, c.warm_interval)) % c.warm_interval == 0
        if c.sparse_interval == 0:
            return False
        since = step - self.warm_steps
        return (since - self._offset(block_id, c.sparse_interval)) % c.sparse_interval == 0

    def stats_due(self, step: int) -> bool:
        """Whether statistics are gathered at this step (for any block)."""
        c = self.cfg
        if self.in_warm_phase(step):
            return step % c.stats_warm_interval == 0 or (c.stagger and c.warm_interval > 1)
        if c.sparse_interval == 0:
            return False
        if c.stats_sparse_interval is not None:
            return (step - self.warm_steps) % c.stats_sparse_interval == 0
        if c.stagger:
            return True
        return self.refresh_due(step)

    def state_dict(self) -> dict:
        return {"warm_steps": self.warm_steps}


def damping_value(cfg: DampingConfig, default: float, step: int) -> float:
    """rho for this step: constant, batch/lr-scaled relative to (B0, lr0), or a user callable."""
    base = default if cfg.value is None else cfg.value
    if cfg.kind == "constant":
        return base
    if cfg.kind == "scaled":
        if cfg.batch_size is None or cfg.lr is None:
            # Silently dropping the scaling would train with the reference damping: refuse instead.
            raise ConfigError("damping.batch_size and damping.lr must be set when damping.kind is 'scaled'")
        factor = (cfg.batch_size / cfg.ref_batch_size) ** cfg.batch_exponent
        factor *= (cfg.lr / cfg.ref_lr) ** cfg.lr_exponent
        return base * factor
    assert cfg.fn is not None
    return float(cfg.fn(step, cfg.batch_size or 0.0, cfg.lr or 0.0))
