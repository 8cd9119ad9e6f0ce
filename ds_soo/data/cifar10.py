"""CIFAR-10 from the shared ``cifar10_jpeg_q75.npz`` (JPEG bytes + offsets), decoded with PIL.

A full decode takes ~16 s on one core, so the decoded uint8 arrays are cached under
``~/.cache/ds_soo`` (``$XDG_CACHE_HOME`` respected), keyed by the source file's size and mtime. A subset
(``data.train_size``) decodes only the images it uses unless the full cache already exists. To skip
decoding altogether, write an arrays file once with ``python -m ds_soo.data.npz --from-cifar10`` and
train with ``data.source=npz`` (see :mod:`ds_soo.data.npz`).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from ds_soo.data.base import images_to_dataset

FILE = "cifar10_jpeg_q75.npz"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ds_soo"


def _cache_path(src: Path, split: str) -> Path:
    st = src.stat()
    return cache_dir() / f"cifar10_q75_{split}_{st.st_size}_{int(st.st_mtime)}.npy"


def _decode(buf: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(indices), 32, 32, 3), dtype=np.uint8)
    for j, i in enumerate(indices):
        out[j] = np.asarray(Image.open(io.BytesIO(buf[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
    return out


def load_split(src: Path, split: str, size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one split, optionally a seeded random subset (the file is sorted by class)."""
    try:
        return _load_split(src, split, size, seed)
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError) as e:
        from ds_soo.config import ConfigError

        raise ConfigError(
            f"data.path: {src} is not a readable CIFAR-10 JPEG archive (needs {split}_jpeg, {split}_offsets, "
            f"{split}_labels): {type(e).__name__}: {e}"
        ) from None


def _load_split(src: Path, split: str, size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(src, allow_pickle=False) as d:
        labels = d[f"{split}_labels"].astype(np.int64)
        n = len(labels)
        order = np.random.default_rng(seed).permutation(n)
        pick = order if size is None else order[: min(size, n)]
        cached = _cache_path(src, split)
        if cached.is_file():
            return np.load(cached, mmap_mode="r")[pick], labels[pick]
        buf, offsets = d[f"{split}_jpeg"], d[f"{split}_offsets"]
        if size is not None and size < n:
            return _decode(buf, offsets, pick), labels[pick]
        images = _decode(buf, offsets, np.arange(n))
    _write_cache(cached, images)
    return images[pick], labels[pick]


def _write_cache(path: Path, images: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, images)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the next run another decode


def load_cifar10_datasets(data_dir: Path, train_size: int | None, eval_size: int | None, seed: int):
    src = data_dir / FILE
    train = load_split(src, "train", train_size, seed)
    test = load_split(src, "test", eval_size, seed + 1)
    return images_to_dataset(*train), images_to_dataset(*test)
