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
# ``log.info(..., extra={FILE_ONLY: True})``: long detail for train.log, not the console (and CONSOLE_ONLY
# for its one-line summary).
FILE_ONLY = "ds_soo_file_only"
CONSOLE_ONLY = "ds_soo_console_only"
# Loggers whose warnings also belong in train.log: the library (ds_soo.*) and Python warnings.
CAPTURED = ("ds_soo", "py.warnings")


class _Skip(logging.Filter):
    def __init__(self, attr: str) -> None:
        super().__init__()
        self.attr = attr

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, self.attr, False)


def setup_logging(out_dir: Path, name: str = "ds_soo.train", rank: int = 0, append: bool = True) -> logging.Logger:
    """Log to ``out_dir/train.log`` and stderr.

    The log is opened for appending, never truncated: a resumed run continues its log, and a rejected
    start (a config error) adds its message below what is there instead of wiping a finished run's log
    (``ds_soo.train`` refuses to start a new run in a folder holding one; see its ``--overwrite``).
    Rank r > 0 of a distributed run logs to ``train.rank{r}.log`` (so ranks never interleave in one
    file) and prints warnings only. Warnings of the ds_soo library and Python ``warnings`` go to the
    same file and console. ``append=False`` starts the file afresh.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s {'' if rank == 0 else f'[rank {rank}] '}%(levelname)s %(message)s",
                            "%H:%M:%S")  # fmt: skip
    file_name = LOG_NAME if rank == 0 else f"train.rank{rank}.log"
    file = logging.FileHandler(out_dir / file_name, mode="a" if append else "w")
    file.addFilter(_Skip(CONSOLE_ONLY))
    stream = logging.StreamHandler(sys.stderr)
    stream.addFilter(_Skip(FILE_ONLY))
    if rank != 0:
        stream.setLevel(logging.WARNING)
    lib_stream = logging.StreamHandler(sys.stderr)
    lib_stream.setLevel(logging.WARNING)
    for handler in (file, stream, lib_stream):
        handler.setFormatter(fmt)
    for logger, handlers, level in (
        (log, (file, stream), logging.INFO),
        *((logging.getLogger(n), (file, lib_stream), logging.WARNING) for n in CAPTURED),
    ):
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        for h in handlers:
            logger.addHandler(h)
        if logger.level == logging.NOTSET or logger.level > level:
            logger.setLevel(level)
        logger.propagate = False
    logging.captureWarnings(True)
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


def param_fingerprints(model: nn.Module) -> dict[str, list[float]]:
    """Per trainable tensor, float64 [sum, sum of squares, sum of absolute values]: compares runs tensor by
    tensor, so one tensor left unmoved (or zeroed) cannot hide behind the others as in one global sum."""
    return {n: _fingerprint(p.detach()) for n, p in model.named_parameters() if p.requires_grad}


def _fingerprint(t: torch.Tensor) -> list[float]:
    t = t.double()
    return [float(t.sum()), float(t.pow(2).sum()), float(t.abs().sum())]


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

    def __init__(self, out_dir: Path, enabled: bool = True, purge_step: int | None = None) -> None:
        self.dir = out_dir / "tb"
        self.enabled = enabled
        # A resumed run: events at steps >= purge_step from the earlier attempt are dropped by readers.
        self.purge_step = purge_step
        self._writer = None

    def add(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir), purge_step=self.purge_step)
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
