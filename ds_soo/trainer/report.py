"""What a run leaves behind: a log file, TensorBoard scalars and ``metrics.json``."""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_soo.preconditioner import COUNTER_NAMES as COUNTER_KEYS

LOG_NAME = "train.log"


def setup_logging(
    out_dir: Path, name: str = "ds_soo.train", rank: int = 0, append: bool = False
) -> logging.Logger:
    """Log to ``out_dir/train.log`` and stderr; the log is the only file a failed config leaves.

    Rank r > 0 of a distributed run logs to ``train.rank{r}.log`` (so ranks never interleave in one
    file) and prints warnings only. ``append`` keeps the log of the run being resumed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s {'' if rank == 0 else f'[rank {rank}] '}%(levelname)s %(message)s",
                            "%H:%M:%S")  # fmt: skip
    file_name = LOG_NAME if rank == 0 else f"train.rank{rank}.log"
    stream = logging.StreamHandler(sys.stderr)
    if rank != 0:
        stream.setLevel(logging.WARNING)
    for handler in (logging.FileHandler(out_dir / file_name, mode="a" if append else "w"), stream):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False
    return log


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on GPU; otherwise the process's max RSS (Linux reports KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def param_sq_sum(model: nn.Module) -> float:
    """float64 sum of squares of trainable parameters: a cheap fingerprint of where training ended."""
    return float(sum(p.detach().double().pow(2).sum() for p in model.parameters() if p.requires_grad))


def counters(pre: Any) -> dict[str, int]:
    out = dict.fromkeys(COUNTER_KEYS, 0)
    if pre is not None:
        out.update({k: int(v) for k, v in pre.counters.items()})
    return out


def _finite(value: Any) -> Any:
    """NaN/inf become null so metrics.json is strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


class Scalars:
    """TensorBoard writer created lazily, so nothing but the log exists until training starts."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.dir = out_dir / "tb"
        self.enabled = enabled
        self._writer = None

    def add(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir))
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
