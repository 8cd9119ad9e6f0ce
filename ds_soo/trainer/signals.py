"""Preemption: SIGTERM (what Slurm sends before it preempts or times out a job, ``--signal=TERM@60``)
and SIGINT (Ctrl-C) ask the run to stop after the current step instead of killing it mid-step.

The handler only records the signal. The loop checks :func:`requested` after each optimizer step and
all ranks agree (one all-reduce of a single number, so a signal that reached only some ranks still
stops every rank at the same step); then the run writes a checkpoint and a partial ``metrics.json``
marked ``"interrupted": true`` and exits with the shell's convention, 128 + signal number (143 for
SIGTERM, 130 for SIGINT), without a traceback. A second SIGINT while stopping restores the default
handler's behaviour (KeyboardInterrupt), for a user who really wants out now.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)
_received: int | None = None


def _handler(signum: int, frame: Any) -> None:
    global _received
    if _received is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt
    _received = signum


def requested() -> int | None:
    """The first stop signal received since :func:`installed` began, else None."""
    return _received


def exit_code(signum: int) -> int:
    return 128 + int(signum)


@contextmanager
def installed() -> Iterator[None]:
    """Handle SIGTERM/SIGINT while training (main thread only); restore the previous handlers after."""
    global _received
    _received = None
    try:
        previous = {s: signal.signal(s, _handler) for s in HANDLED}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def agree(engine: Any, signum: int | None) -> int | None:
    """Collective when distributed: the largest signal number any rank received (None if none)."""
    if not getattr(engine, "distributed", False):
        return signum
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(signum or 0)], device=engine.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    got = int(t.item())
    return got or None
