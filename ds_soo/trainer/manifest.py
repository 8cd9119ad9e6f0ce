"""A checkpoint's manifest: every file's size and sha256, written last and atomically.

A checkpoint directory is trusted only when its ``manifest.json`` exists and every file it lists is
present with the recorded size and checksum. The manifest is the last thing written (after every
rank's files, which are fsynced first), through a temporary file, ``fsync`` and ``os.replace``, so a
crash, a full disk, a truncated copy or a flipped byte anywhere in the checkpoint shows up as a
mismatch before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "ds_soo-checkpoint-manifest"
VERSION = 1
_CHUNK = 1 << 20


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def _sha256(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write(root: Path, step: int) -> Path:
    """Hash (and fsync) every file under ``root``, then write ``root/manifest.json`` atomically."""
    files = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p, sync=True)}
             for p in _files(root)}  # fmt: skip
    for d in {p.parent for p in _files(root)} | {root}:
        _fsync_dir(d)
    body = json.dumps({"format": FORMAT, "version": VERSION, "step": step, "files": files}, indent=1) + "\n"
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    _fsync_dir(root)
    return root / MANIFEST


def verify(root: Path) -> str | None:
    """None when ``root`` is a complete, intact checkpoint; else the first problem, naming the file."""
    path = root / MANIFEST
    if not path.is_file():
        return f"{path} is missing (an interrupted save, or written by an older version)"
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not a ds_soo checkpoint manifest")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable: {e}"
    for name, want in files.items():
        p = root / name
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{p} has {size} bytes, the manifest says {want['size']} (truncated or replaced)"
        if _sha256(p) != want["sha256"]:
            return f"{p} does not match its checksum (damaged)"
    extra = sorted(str(p.relative_to(root)) for p in _files(root) if str(p.relative_to(root)) not in files)
    if extra:
        return f"{root / extra[0]} is not in the manifest (added after the checkpoint was written)"
    return None
