"""Resumable checkpoints: ``OUT/checkpoints/step_K/`` holds everything needed to continue at step K.

Layout of one checkpoint (the engine decides the model/optimizer part)::

    step_K/trainer.pt         rank 0: step, per-step history (losses, lrs, ...), lr schedule, config
    step_K/rng_rank{R}.pt     every rank: torch / CUDA / python / numpy RNG states
    step_K/model.pt, optimizer.pt, ds_soo/           single and DDP (ds_soo/ is DCP when distributed)
    step_K/model_optim/, ds_soo/                     FSDP2 (DCP: each rank writes its own shards)
    step_K/deepspeed/ (with deepspeed/ds_soo/)       DeepSpeed (engine.save_checkpoint + ds_soo)
    latest                                           "step_K", the newest complete checkpoint

Why it is safe to kill a run at any moment: everything is written into ``.tmp-step_K`` and that
directory is renamed to ``step_K`` only after every rank finished writing (a barrier), then ``latest``
is replaced atomically. A checkpoint directory therefore either is complete or does not exist under
its final name; leftovers of an interrupted save are deleted on the next start. The per-step history
is part of the checkpoint, so a resumed run has exactly one loss per step: the steps after the
checkpoint are recomputed, never duplicated, and the data position is the step count (the batch
stream is seeded and is fast-forwarded by that many batches).

OUT must be a directory every rank sees (a shared filesystem across nodes): rank 0 writes the
shared files and renames, every rank reads them back on resume. For a requeued Slurm job, pass
``train.checkpoint_every=N train.resume=true`` on every submission: the first one starts fresh.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ds_soo.config import ConfigError

if TYPE_CHECKING:
    from ds_soo.trainer.loop import History, Session

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_FILE = "trainer.pt"
TMP_PREFIX = ".tmp-"
FORMAT = "ds_soo-trainer-checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
# Config entries that must match for a resumed run to be the continuation of the saved one. Lengths
# (train.steps/epochs), logging, checkpointing and thread counts may change.
MUST_MATCH = ("model", "data", "optim", "precond", "train.batch_size", "train.grad_accum", "train.seed",
              "train.bf16", "train.engine")  # fmt: skip


def checkpoint_root(out_dir: Path) -> Path:
    return out_dir / CHECKPOINTS


def step_dir(out_dir: Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step_{step}"


def _complete(path: Path) -> bool:
    return path.is_dir() and _STEP_RE.match(path.name) is not None and (path / TRAINER_FILE).is_file()


def newest(root: Path) -> Path | None:
    """The highest complete ``step_K`` under ``root``.

    Found by listing rather than by reading ``latest``: a kill between the rename of a finished
    checkpoint and the update of ``latest`` leaves ``latest`` one checkpoint behind, and the newer
    one is just as complete. ``latest`` is for people and tools that want one name to follow.
    """
    steps = [p for p in root.glob("step_*") if _complete(p)] if root.is_dir() else []
    return max(steps, key=lambda p: int(p.name.split("_")[1]), default=None)


def find_resume_point(out_dir: Path, resume: bool | str) -> Path | None:
    """Where to resume from: None for a fresh start (``resume=false``, or true with no checkpoint yet)."""
    if resume is False:
        return None
    if resume is True:
        return newest(checkpoint_root(out_dir))
    path = Path(resume)
    if _complete(path):
        return path
    found = newest(path / CHECKPOINTS) or newest(path)
    if found is None:
        raise ConfigError(f"train.resume: no complete checkpoint at {path} (expected step_K/{TRAINER_FILE})")
    return found


def clean_stale(out_dir: Path) -> None:
    """Remove half-written checkpoints of an interrupted run (rank 0 only, before any new save)."""
    root = checkpoint_root(out_dir)
    if root.is_dir():
        for p in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------- save
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def save(s: Session, h: History, step: int, out_dir: Path, log: logging.Logger) -> Path:
    """Collective: write checkpoint ``step`` atomically, point ``latest`` at it, prune old ones."""
    engine = s.engine
    final = step_dir(out_dir, step)
    tmp = final.with_name(TMP_PREFIX + final.name)
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save_state(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{engine.rank}.pt")
    if engine.is_main:
        trainer = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "history": dataclasses.asdict(h),
            "scheduler": s.scheduler.state_dict(),
            "config": s.resolved,
            "engine": engine.name,
            "world_size": engine.world_size,
        }
        torch.save(trainer, tmp / TRAINER_FILE)
    engine.barrier()  # every rank's files are in tmp: now it may become a checkpoint
    if engine.is_main:
        if final.exists():  # a later run rewriting this step: move the old one out of the way first
            _discard(final)
        os.replace(tmp, final)
        pointer = final.parent / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, final.parent / LATEST)
        _prune(final.parent, s.cfg.train.checkpoint_keep)
        log.info("checkpoint: step %d -> %s", step, final)
    engine.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted((p for p in root.glob("step_*") if _complete(p)), key=lambda p: int(p.name.split("_")[1]))
    for p in steps[:-keep]:
        _discard(p)


def _discard(path: Path) -> None:
    """Rename, then delete: a kill during the deletion leaves a ``.tmp-`` directory (removed on the next
    start), never a half-deleted ``step_K`` that could still look complete."""
    trash = path.with_name(f"{TMP_PREFIX}old-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------------- load
def check_compatible(saved: dict[str, Any], now: dict[str, Any], where: Path, log: logging.Logger) -> None:
    """Refuse to continue a different run; name the first field that differs."""
    flat_saved, flat_now = _flat(saved), _flat(now)
    for key in sorted(set(flat_saved) | set(flat_now)):
        if not any(key == m or key.startswith(m + ".") for m in MUST_MATCH):
            continue
        # The preconditioner's schedule length follows the run length, which may be extended.
        if key in ("precond.schedule.total_steps",):
            continue
        if flat_saved.get(key) != flat_now.get(key):
            raise ConfigError(
                f"train.resume: {where} was saved with {key}={flat_saved.get(key)!r}, this run has "
                f"{flat_now.get(key)!r}; resume with the same settings (or start a fresh --out)"
            )
    for key in ("train.steps", "train.epochs"):
        if flat_saved.get(key) != flat_now.get(key):
            log.warning("resuming with %s=%r (saved run had %r): the lr schedule follows the new length",
                        key, flat_now.get(key), flat_saved.get(key))  # fmt: skip


def load(s: Session, path: Path, log: logging.Logger) -> tuple[History, int]:
    """Collective: restore model, optimizer, ds_soo, schedule, history and RNG; returns (history, step)."""
    from ds_soo.trainer.loop import History

    engine = s.engine
    trainer = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    if trainer.get("format") != FORMAT:
        raise ConfigError(f"train.resume: {path / TRAINER_FILE} is not a ds_soo trainer checkpoint")
    check_compatible(trainer["config"], s.resolved, path, log)
    if trainer["engine"] in ("deepspeed",) and trainer["world_size"] != engine.world_size:
        raise ConfigError(
            f"train.resume: {path} was saved by DeepSpeed at world size {trainer['world_size']}, this run has "
            f"{engine.world_size}; DeepSpeed's ZeRO partitions need the same world size"
        )
    engine.load_state(path)
    s.scheduler.load_state_dict(trainer["scheduler"])
    history = History(**trainer["history"])
    rng_file = path / f"rng_rank{engine.rank}.pt"
    if not rng_file.is_file():  # another world size: ranks beyond the saved ones take rank 0's state
        rng_file = path / "rng_rank0.pt"
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    step = int(trainer["step"])
    log.info("resumed from %s at step %d (%d losses kept)", path, step, len(history.train_loss))
    return history, step
