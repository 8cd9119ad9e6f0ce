"""Resumable checkpoints: ``OUT/checkpoints/step_K/`` holds everything needed to continue at step K.

Layout of one checkpoint (the engine decides the model/optimizer part)::

    step_K/trainer.pt         rank 0: step, per-step history (losses, lrs, ...), lr schedule, config
    step_K/rng_rank{R}.pt     every rank: torch / CUDA / python / numpy RNG states (as tensors and lists)
    step_K/manifest.json      written last: size and sha256 of every file above (ds_soo.trainer.manifest)
    step_K/model.pt, optimizer.pt, ds_soo/           single and DDP (ds_soo/ is DCP when distributed)
    step_K/model_optim/, ds_soo/                     FSDP2 (DCP: each rank writes its own shards)
    step_K/deepspeed/ (with deepspeed/ds_soo/)       DeepSpeed (engine.save_checkpoint + ds_soo)
    latest                                           "step_K", the newest complete checkpoint

Why it is safe to kill a run at any moment: everything is written into ``.tmp-step_K``; after every
rank finished writing (a barrier) rank 0 writes the manifest (atomically, fsynced), renames the
directory to ``step_K`` and replaces ``latest`` atomically. A checkpoint directory therefore either is
complete or does not exist under its final name; leftovers of an interrupted save are deleted on the
next start.

Why a damaged checkpoint costs at most the steps since the previous one: on resume rank 0 checks the
newest ``step_K`` against its manifest and reads ``trainer.pt``; if anything is missing, truncated,
changed or unreadable it says which checkpoint it skips and why and tries the next older one. Every
rank then resumes from the step rank 0 chose (broadcast). No valid checkpoint at all is a
:class:`ConfigError` (exit 2) naming each file that failed.

Loading runs no code: every file the trainer reads is loaded with ``torch.load(weights_only=True)``
(tensors and plain containers only); RNG states are stored as tensors and lists, not pickled objects.
A file holding anything else is refused.

Extending a run (a larger ``train.steps`` or ``train.epochs`` on resume) is supported: the lr schedule
and the curvature schedule's ``total_steps`` both follow the new length from the resume step on (the
lr jumps to where the longer schedule is at that step). Every other setting that shapes training
must match (``MUST_MATCH``). The per-step history
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
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ds_soo.config import ConfigError
from ds_soo.trainer import manifest
from ds_soo.trainer.history import History


class _Run(Protocol):
    """What saving and loading need of a built run (``loop.Session`` provides it)."""

    cfg: Any
    engine: Any
    scheduler: Any
    resolved: dict[str, Any]


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
# Options added after this checkpoint format, with the behaviour of a checkpoint saved before them: a
# missing entry compares as that value, so an older run resumes when this one keeps its behaviour, and
# otherwise the error names the value to set.
BEFORE_OPTION_EXISTED = {"precond.schedule.auto_growth": "doubling", "precond.shampoo.pack_statistics": False}


def checkpoint_root(out_dir: Path) -> Path:
    return out_dir / CHECKPOINTS


def step_dir(out_dir: Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step_{step}"


def _complete(path: Path) -> bool:
    return path.is_dir() and _STEP_RE.match(path.name) is not None and (path / manifest.MANIFEST).is_file()


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def candidates(root: Path) -> list[Path]:
    """Every ``step_K`` directory under ``root``, newest first.

    Found by listing rather than by reading ``latest``: a kill between the rename of a finished
    checkpoint and the update of ``latest`` leaves ``latest`` one checkpoint behind, and the newer
    one is just as complete. ``latest`` is for people and tools that want one name to follow.
    """
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(steps, key=_step_of, reverse=True)


def newest(root: Path) -> Path | None:
    """The highest ``step_K`` under ``root`` that has a manifest (not yet verified)."""
    return next((p for p in candidates(root) if _complete(p)), None)


def _load_safe(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"train.resume: {path} cannot be loaded safely (only tensors and plain containers are accepted): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def check_checkpoint(path: Path) -> str | None:
    """None when ``path`` is usable: manifest matches and ``trainer.pt`` loads safely; else why not."""
    problem = manifest.verify(path)
    if problem is not None:
        return problem
    try:
        trainer = _load_safe(path / TRAINER_FILE)
    except ConfigError as e:
        return str(e).removeprefix("train.resume: ")
    if not isinstance(trainer, dict) or trainer.get("format") != FORMAT:
        return f"{path / TRAINER_FILE} is not a ds_soo trainer checkpoint"
    if int(trainer.get("version", 0)) > VERSION:
        return f"{path / TRAINER_FILE} has version {trainer['version']}; this ds_soo reads <= {VERSION}"
    return None


def _choose(out_dir: Path, resume: bool | str, log: logging.Logger) -> Path | str | None:
    """Rank 0's choice: a checkpoint path, None (fresh start), or an error message (str)."""
    if resume is False:
        return None
    if resume is True:
        root, fresh_ok = checkpoint_root(out_dir), True
        found = candidates(root)
    else:
        path, fresh_ok = Path(resume), False
        found = [path] if _STEP_RE.match(path.name) and path.is_dir() else candidates(path / CHECKPOINTS)
        found = found or candidates(path)
        root = path
    if not found:
        if fresh_ok:
            return None
        return f"train.resume: no checkpoint at {root} (expected step_K/{manifest.MANIFEST})"
    skipped = []
    for p in found:
        problem = check_checkpoint(p)
        if problem is None:
            if skipped:
                log.warning("resuming from %s instead of the newer %s", p.name, ", ".join(s for s, _ in skipped))
            return p
        log.warning("train.resume: skipping checkpoint %s: %s", p.name, problem)
        skipped.append((p.name, problem))
    return "train.resume: no valid checkpoint under {}: {}".format(root, "; ".join(f"{n}: {w}" for n, w in skipped))


def find_resume_point(
    out_dir: Path, resume: bool | str, engine: Any = None, log: logging.Logger | None = None
) -> Path | None:
    """Where to resume from: None for a fresh start (``resume=false``, or true with no checkpoint yet).

    Collective with a distributed ``engine``: rank 0 verifies and chooses, every rank gets its choice,
    so all ranks resume from the same step (or all raise the same ConfigError).
    """
    log = log or logging.getLogger("ds_soo.train")
    main = engine is None or engine.is_main
    choice: Path | str | None = _choose(out_dir, resume, log) if main else None
    if engine is not None and getattr(engine, "distributed", False):
        import torch.distributed as dist

        box = [str(choice) if isinstance(choice, Path) else choice, isinstance(choice, Path)]
        dist.broadcast_object_list(box, src=0)
        choice = Path(box[0]) if box[1] else box[0]
    if isinstance(choice, str):
        raise ConfigError(choice)
    return choice


def clean_stale(out_dir: Path) -> None:
    """Remove half-written checkpoints of an interrupted run (rank 0 only, before any new save)."""
    root = checkpoint_root(out_dir)
    if root.is_dir():
        for p in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every RNG the run uses, as tensors, ints, floats and lists (``weights_only=True`` reads them)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
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


def save(s: _Run, h: History, step: int, out_dir: Path, log: logging.Logger) -> Path:
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
        manifest.write(tmp, step)  # last: a directory without a matching manifest is never trusted
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
def _follow_new_length(scheduler: Any) -> None:
    """After loading a LambdaLR saved by a run of another length: the lr of the next step comes from
    this run's (new-length) schedule at the saved position, not from the saved run's last lr."""
    at = scheduler.last_epoch
    lrs = [base * fn(at) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports; LambdaLR.step() sets it the same way


def check_compatible(saved: dict[str, Any], now: dict[str, Any], where: Path, log: logging.Logger) -> None:
    """Refuse to continue a different run; name the first field that differs."""
    flat_saved, flat_now = _flat(saved), _flat(now)
    older = {k: v for k, v in BEFORE_OPTION_EXISTED.items() if k not in flat_saved and k in flat_now}
    flat_saved.update(older)
    for key in sorted(set(flat_saved) | set(flat_now)):
        if not any(key == m or key.startswith(m + ".") for m in MUST_MATCH):
            continue
        # The preconditioner's schedule length follows the run length, which may be extended.
        if key in ("precond.schedule.total_steps",):
            continue
        if flat_saved.get(key) != flat_now.get(key):
            before = " (saved before the option existed)" if key in older else ""
            raise ConfigError(
                f"train.resume: {where} was saved with {key}={flat_saved.get(key)!r}{before}, this run has "
                f"{flat_now.get(key)!r}; resume with the same settings (or start a fresh --out)"
            )
    for key in ("train.steps", "train.epochs"):
        if flat_saved.get(key) != flat_now.get(key):
            log.warning("resuming with %s=%r (saved run had %r): the lr schedule and the curvature schedule's "
                        "total_steps follow the new length", key, flat_now.get(key), flat_saved.get(key))  # fmt: skip


def load(s: _Run, path: Path, log: logging.Logger) -> tuple[History, int]:
    """Collective: restore model, optimizer, ds_soo, schedule, history and RNG; returns (history, step).

    The trainer's own files are read (safely) before the engine restores anything, so a refused file
    leaves the freshly built run untouched.
    """
    engine = s.engine
    trainer = _load_safe(path / TRAINER_FILE)
    if not isinstance(trainer, dict) or trainer.get("format") != FORMAT:
        raise ConfigError(f"train.resume: {path / TRAINER_FILE} is not a ds_soo trainer checkpoint")
    check_compatible(trainer["config"], s.resolved, path, log)
    if trainer["engine"] in ("deepspeed",) and trainer["world_size"] != engine.world_size:
        raise ConfigError(
            f"train.resume: {path} was saved by DeepSpeed at world size {trainer['world_size']}, this run has "
            f"{engine.world_size}; DeepSpeed's ZeRO partitions need the same world size"
        )
    rng_file = path / f"rng_rank{engine.rank}.pt"
    if not rng_file.is_file():  # another world size: ranks beyond the saved ones take rank 0's state
        rng_file = path / "rng_rank0.pt"
    rng = _load_safe(rng_file)
    try:
        history = History(**trainer["history"])
    except TypeError as e:
        raise ConfigError(f"train.resume: {path / TRAINER_FILE} holds an unknown history layout: {e}") from None
    saved_total = _flat(trainer["config"]).get("precond.schedule.total_steps")
    now_total = _flat(s.resolved).get("precond.schedule.total_steps")
    # An extended run: the trainer checked every other precond field above, so ds_soo may accept a
    # different total_steps (its relaxed check still refuses any structural difference).
    engine.resume_strict = saved_total == now_total
    engine.load_state(path)
    s.scheduler.load_state_dict(trainer["scheduler"])
    if saved_total != now_total:
        _follow_new_length(s.scheduler)
    try:
        set_rng_state(rng)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ConfigError(f"train.resume: {rng_file} holds no usable RNG state: {type(e).__name__}: {e}") from None
    step = int(trainer["step"])
    log.info("resumed from %s at step %d (%d losses kept)", path, step, len(history.train_loss))
    return history, step
