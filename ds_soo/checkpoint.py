"""Save and restore ds_soo's curvature state next to each engine's own checkpoint.

Only a block's owner rank holds its factors and inverses, so a checkpoint is written the same way
the state lives: sharded by block. Two on-disk formats carry the same content:

* **plain** (one process): ``<dir>/ds_soo.pt``, a ``torch.save`` of a nested dict;
* **DCP** (``torch.distributed`` initialised): ``<dir>/.metadata`` and ``<dir>/__<rank>_0.distcp``
  from ``torch.distributed.checkpoint``; every rank writes the blocks it owns under their block id,
  so each block is written exactly once and no rank ever holds more than its own share.

Loading reads whichever blocks this rank owns *now*, from either format, so a different world size
or assignment just works: blocks move to their new owners. Global counters (the schedule position
is ``counters["optimizer_steps"]``) are identical on every rank and stored once; per-block counters
travel with their block; ``inverse_failures``, the one per-rank counter, is restored per rank at the
same world size and summed onto rank 0 otherwise, so its sum over ranks is preserved.

A checkpoint also records the preconditioner config and every block's id and shape. Loading into a
preconditioner whose config differs raises :class:`ConfigError` naming the field (``strict=False``
relaxes that to the fields that change what the stored tensors mean), and a different set of blocks
(another model, another ``max_preconditioner_dim``) is always an error, before anything is changed.

``save(pre, dir)`` / ``load(pre, dir)`` pick the format; DeepSpeed users call
``save_deepspeed(engine, save_dir)`` / ``load_deepspeed(engine, load_dir)``, which wrap
``engine.save_checkpoint`` / ``engine.load_checkpoint`` and keep ds_soo's part in ``<tag>/ds_soo``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ds_soo.config import ConfigError
from ds_soo.preconditioner import Preconditioner

log = logging.getLogger(__name__)

FORMAT = "ds_soo-checkpoint"
VERSION = 1
PLAIN_FILE = "ds_soo.pt"
DCP_METADATA = ".metadata"
DEEPSPEED_SUBDIR = "ds_soo"
CLIENT_STATE_KEY = "ds_soo"

# Preconditioner.state_dict() entries keyed by block id: they travel with their block.
PER_BLOCK_KEYS = ("block_refreshes", "block_preconditioned", "block_auto")
# Of those, the per-block counts (the others are JSON-able dicts, e.g. sparse_interval="auto" state).
PER_BLOCK_COUNTS = ("block_refreshes", "block_preconditioned")
# The one global counter that is counted on the owner only (see Preconditioner._count_refresh).
PER_RANK_COUNTERS = ("inverse_failures",)
# Config fields that may differ on resume without changing the state's meaning: runtime values fed
# by set_hyperparams, and placement knobs (blocks are re-assigned on load anyway).
RUNTIME_FIELDS = frozenset(
    {"damping.batch_size", "damping.lr", "damping.fn", "dist.bucket_mb", "dist.assignment", "dist.grad_worker_fraction"}
)
# Config fields that define what the stored tensors are; they must match even with strict=False.
STRUCTURAL_FIELDS = frozenset(
    {
        "method",
        "exclude",
        "shampoo.max_preconditioner_dim",
        "shampoo.exponent",
        "shampoo.grafting",
        "psgd.max_preconditioner_dim",
    }
)

# DCP keys. Block ids contain dots and brackets but never "/", so "/" separates the parts.
_HEADER_KEY = "ds_soo/header"
_RANK_PREFIX = "ds_soo/rank/"
_BLOCK_PREFIX = "ds_soo/block/"
_META = "__meta__"


@dataclass
class LoadResult:
    """What a load did on this rank: which blocks it filled and which of them changed owner."""

    path: str
    format: str
    saved_world_size: int
    world_size: int
    optimizer_steps: int
    loaded_blocks: list[str] = field(default_factory=list)
    moved_blocks: list[str] = field(default_factory=list)

    @property
    def resharded(self) -> bool:
        return self.saved_world_size != self.world_size or bool(self.moved_blocks)


# --------------------------------------------------------------------------- snapshot (format-free)
def _split_state(pre: Preconditioner) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """Split ``pre.state_dict()`` into the global part, this rank's part and per-block parts.

    Going through ``Preconditioner.state_dict`` keeps new global fields flowing into checkpoints.
    """
    sd = pre.state_dict()
    blocks_sd = sd.pop("blocks")
    per_block = {key: sd.pop(key, {}) or {} for key in PER_BLOCK_KEYS}
    counters = dict(sd.get("counters", {}))
    rank_part = {"counters": {k: counters.pop(k) for k in PER_RANK_COUNTERS if k in counters}}
    sd["counters"] = counters
    blocks: dict[str, dict[str, Any]] = {}
    for bid, state in blocks_sd.items():
        entry = {"state": state}
        for key in PER_BLOCK_KEYS:
            if bid in per_block[key]:
                value = per_block[key][bid]
                entry[key] = int(value) if key in PER_BLOCK_COUNTS else value
        blocks[bid] = entry
    header = {
        "format": FORMAT,
        "version": VERSION,
        "world_size": pre.world_size,
        "owner_of": dict(pre.owner_of),
        "block_dims": {b.block_id: list(b.dims) for b in pre.blocks},
        "config": _config_dict(pre),
        "global": sd,
    }
    try:
        json.dumps(header)
    except TypeError as e:  # the DCP format stores the header as JSON
        raise TypeError(f"ds_soo checkpoint header must be JSON-serialisable: {e}") from e
    return header, rank_part, blocks


def _config_dict(pre: Preconditioner) -> dict[str, Any]:
    cfg = pre.cfg.to_dict()
    cfg.get("damping", {}).pop("fn", None)
    return cfg


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def check_compatible(pre: Preconditioner, header: Mapping[str, Any], strict: bool = True, where: str = "") -> None:
    """Raise ConfigError naming the first mismatching field or block; changes nothing.

    ``strict`` compares every config field except runtime/placement ones; without it only the
    structural fields must match and the other differences are logged.
    """
    src = f" at {where}" if where else ""
    if header.get("format") != FORMAT:
        raise ConfigError(f"{where or 'this'} is not a ds_soo checkpoint (format={header.get('format')!r})")
    if int(header.get("version", 0)) > VERSION:
        raise ConfigError(f"ds_soo checkpoint{src} has version {header['version']}; this ds_soo reads <= {VERSION}")
    saved, now = _flatten(header.get("config", {})), _flatten(_config_dict(pre))
    # method first: the most likely mistake, and it explains every other difference. A field known
    # to only one side (an option added or removed between ds_soo versions) is not compared.
    names = ["method"] + sorted((set(saved) & set(now)) - {"method"})
    relaxed = []
    for name in names:
        if name in RUNTIME_FIELDS or saved.get(name) == now.get(name):
            continue
        msg = (
            f"ds_soo checkpoint{src} does not match this preconditioner: ds_soo.{name} is "
            f"{now.get(name)!r} here but {saved.get(name)!r} in the checkpoint"
        )
        if strict or name in STRUCTURAL_FIELDS:
            raise ConfigError(msg + ("" if strict else " (this field defines the stored state)"))
        relaxed.append(f"ds_soo.{name}: {saved.get(name)!r} -> {now.get(name)!r}")
    if relaxed:
        log.warning("resuming ds_soo with changed config (strict=False): %s", "; ".join(relaxed))
    saved_dims = {b: list(d) for b, d in header.get("block_dims", {}).items()}
    now_dims = {b.block_id: list(b.dims) for b in pre.blocks}
    missing = sorted(set(now_dims) - set(saved_dims))
    extra = sorted(set(saved_dims) - set(now_dims))
    if missing or extra:
        raise ConfigError(
            f"ds_soo checkpoint{src} holds other curvature blocks than this model: "
            f"not in checkpoint {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"only in checkpoint {extra[:5]}{'...' if len(extra) > 5 else ''} "
            "(different model, exclude patterns, max_preconditioner_dim, or a ds_soo version that blocks differently)"
        )
    for bid, dims in now_dims.items():
        if saved_dims[bid] != dims:
            raise ConfigError(f"ds_soo checkpoint{src}: block {bid} is {saved_dims[bid]} there but {dims} here")


def _check_complete(pre: Preconditioner, present: set[str], path: Path) -> None:
    """Every block must have saved state.

    Checked on every rank for every block, not only the owned ones, so that all ranks raise
    together instead of one raising while the others go on into the next collective and hang.
    """
    lost = sorted(b.block_id for b in pre.blocks if b.block_id not in present)
    if lost:
        raise ConfigError(f"ds_soo checkpoint at {path} has no state for blocks {lost[:5]} (incomplete checkpoint?)")


def _apply(
    pre: Preconditioner,
    header: dict[str, Any],
    ranks: dict[int, dict[str, Any]],
    blocks: dict[str, dict[str, Any]],
    *,
    path: str,
    fmt: str,
) -> LoadResult:
    """Put a validated snapshot (blocks = exactly the ones this rank owns) into ``pre``."""
    owned = [b.block_id for b in pre.blocks if pre.owner_of[b.block_id] == pre.rank]
    assert all(b in blocks for b in owned), "_check_complete runs first"
    saved_world = int(header["world_size"])
    state = dict(header["global"])
    counters = dict(state.get("counters", {}))
    for name in PER_RANK_COUNTERS:
        if saved_world == pre.world_size and pre.rank in ranks:
            counters[name] = ranks[pre.rank].get("counters", {}).get(name, 0)
        else:  # other world size: keep the sum over ranks, on rank 0
            total = sum(r.get("counters", {}).get(name, 0) for r in ranks.values())
            counters[name] = total if pre.rank == 0 else 0
    state["counters"] = counters
    state["blocks"] = {bid: blocks[bid]["state"] for bid in owned}
    for key in PER_BLOCK_KEYS:
        state[key] = {bid: blocks[bid][key] for bid in owned if key in blocks[bid]}
    pre.load_state_dict(state)
    saved_owner = header.get("owner_of", {})
    moved = [b for b in owned if saved_world != pre.world_size or saved_owner.get(b) != pre.rank]
    return LoadResult(path, fmt, saved_world, pre.world_size, pre.counters["optimizer_steps"], owned, moved)


# --------------------------------------------------------------------------- plain format
def save_preconditioner(pre: Preconditioner, path: str | os.PathLike) -> Path:
    """Write ``<path>/ds_soo.pt`` (torch.save). Only for a preconditioner that holds every block."""
    if len(pre.states) != len(pre.blocks):
        raise RuntimeError(
            f"rank {pre.rank} holds {len(pre.states)} of {len(pre.blocks)} curvature blocks; a sharded "
            "preconditioner must be saved with ds_soo.checkpoint.save (torch.distributed.checkpoint)"
        )
    header, rank_part, blocks = _split_state(pre)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"header": header, "ranks": {pre.rank: rank_part}, "blocks": blocks}
    tmp = out / (PLAIN_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out / PLAIN_FILE)  # never leave a half-written checkpoint under the real name
    _remove(out / DCP_METADATA)
    return out / PLAIN_FILE


def _load_plain(pre: Preconditioner, path: Path, strict: bool) -> LoadResult:
    payload = torch.load(path / PLAIN_FILE, map_location="cpu", weights_only=True)
    header = payload["header"]
    check_compatible(pre, header, strict, str(path))
    _check_complete(pre, set(payload["blocks"]), path)
    device = pre._device()
    blocks = {
        bid: {**entry, "state": _to_device(entry["state"], device)}
        for bid, entry in payload["blocks"].items()
        if pre.owner_of.get(bid) == pre.rank
    }
    ranks = {int(r): v for r, v in payload.get("ranks", {}).items()}
    return _apply(pre, header, ranks, blocks, path=str(path), fmt="plain")


def _to_device(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


# --------------------------------------------------------------------------- DCP format
def _group(pre: Preconditioner):
    return getattr(pre.access, "group", None)


@contextlib.contextmanager
def _quiet_no_dist():
    """DCP warns that it "assumes a single process" even when asked for one; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def save_distributed(pre: Preconditioner, path: str | os.PathLike) -> Path:
    """Collective: every rank writes its owned blocks to a DCP checkpoint at ``path``."""
    import torch.distributed.checkpoint as dcp

    header, rank_part, blocks = _split_state(pre)
    flat: dict[str, Any] = {_HEADER_KEY: json.dumps(header), f"{_RANK_PREFIX}{pre.rank}": json.dumps(rank_part)}
    for bid, entry in blocks.items():
        meta = {k: v for k, v in entry.items() if k != "state"}
        meta["none"], meta["values"], meta["perm"] = [], {}, {}
        for name, value in entry["state"].items():
            if isinstance(value, torch.Tensor):
                order = _storage_order(value)
                if order is not None:  # store the memory layout as is; see _storage_order
                    meta["perm"][name] = order
                    value = value.permute(order)
                flat[f"{_BLOCK_PREFIX}{bid}/{name}"] = value.detach().contiguous()
            elif value is None:
                meta["none"].append(name)
            else:
                meta["values"][name] = value
        flat[f"{_BLOCK_PREFIX}{bid}/{_META}"] = json.dumps(meta)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if pre.rank == 0:
        _remove(out / PLAIN_FILE)
    with _quiet_no_dist():
        dcp.save(flat, checkpoint_id=str(out), process_group=_group(pre), no_dist=not dist.is_initialized())
    return out


def _storage_order(t: torch.Tensor) -> list[int] | None:
    """For a non-contiguous tensor laid out as a permutation of a contiguous one (a transpose), that permutation.

    DCP stores values in row-major order and loads into whatever tensor it is given. Inverses from
    Cholesky come out column-major, and a matmul with a transposed operand rounds differently, so a
    bitwise resume needs the original layout: the tensor is saved permuted (contiguous as stored in
    memory) and permuted back after loading.
    """
    if t.is_contiguous() or t.dim() < 2:
        return None
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None


def _meta_block(key: str) -> str | None:
    """The block id of a block's meta key, else None."""
    suffix = "/" + _META
    return key[len(_BLOCK_PREFIX) : -len(suffix)] if key.startswith(_BLOCK_PREFIX) and key.endswith(suffix) else None


def _load_distributed(pre: Preconditioner, path: Path, strict: bool) -> LoadResult:
    """Read only this rank's blocks (plus the header and the per-rank counters) from a DCP checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    entries = metadata.state_dict_metadata
    if _HEADER_KEY not in entries:
        raise ConfigError(f"{path} is a torch.distributed.checkpoint without ds_soo state")
    device = pre._device()
    want: dict[str, Any] = {}
    for key, md in entries.items():
        if key == _HEADER_KEY or key.startswith(_RANK_PREFIX):
            want[key] = None
        elif key.startswith(_BLOCK_PREFIX):
            bid = key[len(_BLOCK_PREFIX) :].rsplit("/", 1)[0]
            if pre.owner_of.get(bid) != pre.rank:
                continue
            if isinstance(md, TensorStorageMetadata):
                want[key] = torch.empty(md.size, dtype=md.properties.dtype, device=device)
            else:
                want[key] = None
    # Collective (every rank asks for its own keys); a mismatch is raised below, on every rank alike,
    # since each rank validates the same header against the same block list.
    with _quiet_no_dist():
        dcp.load(want, checkpoint_id=str(path), process_group=_group(pre), no_dist=not dist.is_initialized())
    header = json.loads(want[_HEADER_KEY])
    check_compatible(pre, header, strict, str(path))
    _check_complete(pre, {b for b in map(_meta_block, entries) if b is not None}, path)
    ranks = {int(k[len(_RANK_PREFIX) :]): json.loads(v) for k, v in want.items() if k.startswith(_RANK_PREFIX)}
    by_block: dict[str, dict[str, Any]] = {}
    for key, value in want.items():
        if key.startswith(_BLOCK_PREFIX):
            bid, name = key[len(_BLOCK_PREFIX) :].rsplit("/", 1)
            by_block.setdefault(bid, {})[name] = value
    blocks: dict[str, dict[str, Any]] = {}
    for bid, items in by_block.items():
        meta = json.loads(items.pop(_META))
        state: dict[str, Any] = dict.fromkeys(meta.pop("none"), None)
        state.update(meta.pop("values"))
        perms = meta.pop("perm", {})
        for name, tensor in items.items():
            order = perms.get(name)
            # permute back: the same values, with the strides the saved tensor had
            state[name] = tensor if order is None else tensor.permute(sorted(range(len(order)), key=order.__getitem__))
        blocks[bid] = {**meta, "state": state}
    return _apply(pre, header, ranks, blocks, path=str(path), fmt="dcp")


# --------------------------------------------------------------------------- engine-agnostic pair
def checkpoint_format(path: str | os.PathLike) -> str | None:
    """The format of the ds_soo checkpoint in ``path``: "plain", "dcp", or None if there is none."""
    p = Path(path)
    if (p / DCP_METADATA).is_file():
        return "dcp"
    if (p / PLAIN_FILE).is_file():
        return "plain"
    return None


def save(pre: Preconditioner, path: str | os.PathLike) -> Path:
    """Save ds_soo state to directory ``path``: DCP (collective) under torch.distributed, else torch.save."""
    if dist.is_available() and dist.is_initialized():
        return save_distributed(pre, path)
    return save_preconditioner(pre, path)


def load(pre: Preconditioner, path: str | os.PathLike, strict: bool = True) -> LoadResult:
    """Restore ds_soo state from either format into the blocks this rank owns now (collective for DCP).

    Call it on a freshly built preconditioner, after the engine restored the model, before training.
    """
    p = Path(path)
    fmt = checkpoint_format(p)
    if fmt is None:
        raise FileNotFoundError(f"no ds_soo checkpoint in {p} (expected {PLAIN_FILE} or a DCP {DCP_METADATA})")
    result = _load_distributed(pre, p, strict) if fmt == "dcp" else _load_plain(pre, p, strict)
    log.info(
        "ds_soo: loaded %d blocks (%d moved) at step %d from %s (%s, saved at world size %d)",
        len(result.loaded_blocks), len(result.moved_blocks), result.optimizer_steps, p, fmt, result.saved_world_size,
    )  # fmt: skip
    return result


load_preconditioner = load


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- DeepSpeed
def _preconditioner_of(engine: Any) -> Preconditioner:
    pre = getattr(engine, "ds_soo", None)
    if pre is None:
        raise RuntimeError("this engine has no ds_soo preconditioner; call ds_soo.integrations.deepspeed.attach")
    return pre


def save_deepspeed(
    engine: Any,
    save_dir: str | os.PathLike,
    tag: str | None = None,
    client_state: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Path:
    """``engine.save_checkpoint`` plus ds_soo's state in ``<save_dir>/<tag>/ds_soo`` (collective).

    The tag defaults to DeepSpeed's own (``global_step<N>``). ``client_state`` gets a small
    ``"ds_soo"`` entry so that loading can tell that both halves come from the same step.
    """
    pre = _preconditioner_of(engine)
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    client = dict(client_state or {})
    client[CLIENT_STATE_KEY] = {"subdir": DEEPSPEED_SUBDIR, "optimizer_steps": pre.counters["optimizer_steps"]}
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client, **kwargs)
    return save(pre, Path(save_dir) / tag / DEEPSPEED_SUBDIR)


def load_deepspeed(
    engine: Any,
    load_dir: str | os.PathLike,
    tag: str | None = None,
    strict: bool = True,
    require: bool = True,
    **kwargs: Any,
) -> tuple[Any, Any, LoadResult | None]:
    """``engine.load_checkpoint`` then ds_soo's state from the same tag folder.

    Returns DeepSpeed's ``(load_path, client_state)`` and the :class:`LoadResult` (None when no
    ds_soo state was loaded). A tag without ds_soo state (e.g. a first-order run's checkpoint)
    raises unless ``require=False``, which keeps the fresh curvature state and warns.
    """
    pre = _preconditioner_of(engine)
    if tag is None:
        latest = Path(load_dir) / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
    load_path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
    if load_path is None:
        return load_path, client_state, None
    where = Path(load_dir) / str(tag) / DEEPSPEED_SUBDIR
    if checkpoint_format(where) is None:
        if require:
            raise FileNotFoundError(f"DeepSpeed checkpoint {Path(load_dir) / str(tag)} has no ds_soo state at {where}")
        log.warning("DeepSpeed checkpoint %s has no ds_soo state; curvature starts fresh", where.parent)
        return load_path, client_state, None
    result = load(pre, where, strict=strict)
    marker = (client_state or {}).get(CLIENT_STATE_KEY)
    if marker is not None and int(marker.get("optimizer_steps", -1)) != result.optimizer_steps:
        raise RuntimeError(
            f"ds_soo state in {where} is at optimizer step {result.optimizer_steps} but the DeepSpeed checkpoint "
            f"was saved at ds_soo step {marker.get('optimizer_steps')}: the two halves come from different saves"
        )
    return load_path, client_state, result


__all__ = [
    "LoadResult",
    "check_compatible",
    "checkpoint_format",
    "load",
    "load_deepspeed",
    "load_preconditioner",
    "save",
    "save_deepspeed",
    "save_distributed",
    "save_preconditioner",
]
