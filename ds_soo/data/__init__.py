"""Data sources for the trainer, all ending in :class:`ImageData` or :class:`CharData`."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ds_soo.config import ConfigError
from ds_soo.data.base import CharData, DataBundle, ImageData, dataset_to_arrays
from ds_soo.data.config import DataConfig, resolve_data_path

__all__ = ["CharData", "DataBundle", "ImageData", "build_data"]


def _subset(ds, size: int | None, seed: int):
    return ds if size is None or size >= len(ds) else ds.shuffle(seed=seed).select(range(size))


class _ModelKind(Protocol):
    kind: str


class DataSpec(Protocol):
    """What :func:`build_data` reads of a config: the data section and the model's kind."""

    data: DataConfig
    model: _ModelKind


def _images(cfg: DataConfig, data_dir: Path | None) -> ImageData:
    if cfg.source == "npz":
        from ds_soo.data.npz import load_npz

        (xtr, ytr), (xte, yte) = load_npz(Path(cfg.file), cfg.eval_fraction, cfg.seed)
        train, test = (
            _subset_arrays(xtr, ytr, cfg.train_size, cfg.seed),
            _subset_arrays(xte, yte, cfg.eval_size, cfg.seed + 1),
        )
        num_classes = int(max(ytr.max(), yte.max())) + 1
        try:
            return ImageData(cfg.source, train, test, num_classes)
        except ValueError as e:
            raise ConfigError(f"data.file: {cfg.file}: {e}") from None
    if cfg.source == "digits":
        from ds_soo.data.digits import load_digits_datasets

        train, test = load_digits_datasets(cfg)
        num_classes, shape = 10, (8, 8, 1)
    elif cfg.source == "cifar10":
        from ds_soo.data.cifar10 import load_cifar10_datasets

        assert data_dir is not None
        train, test = load_cifar10_datasets(data_dir, cfg.train_size, cfg.eval_size, cfg.seed)
        num_classes, shape = 10, (32, 32, 3)
    else:
        from ds_soo.data.online import load_image_source

        train, test, num_classes, side = load_image_source(cfg)
        shape = (side, side, len(train[0]["pixels"]) // (side * side))
    train = _subset(train, cfg.train_size, cfg.seed)
    test = _subset(test, cfg.eval_size, cfg.seed + 1)
    return ImageData(cfg.source, dataset_to_arrays(train, shape), dataset_to_arrays(test, shape), num_classes)


def _subset_arrays(x, y, size: int | None, seed: int):
    """A seeded random subset of (images, labels), as ``_subset`` does for datasets."""
    if size is None or size >= len(y):
        return x, y
    import numpy as np

    pick = np.random.default_rng(seed).permutation(len(y))[:size]
    return x[pick], y[pick]


def _text(cfg: DataConfig, data_dir: Path | None) -> CharData:
    from ds_soo.data.text import SHAKESPEARE, read_text

    if cfg.source == "shakespeare":
        assert data_dir is not None
        text = read_text(data_dir / SHAKESPEARE, "data.path")
    elif cfg.source == "text_file":
        text = read_text(Path(cfg.file), "data.file")
    else:
        from ds_soo.data.online import load_hub_text

        text = load_hub_text(cfg)
    try:
        return CharData(cfg.source, text, cfg.eval_fraction, cfg.block_size, cfg.eval_windows, cfg.train_size)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None


def build_data(cfg: DataSpec) -> DataBundle:
    """Load the configured source; images for ``model.kind=vit``, a char stream for ``gpt``."""
    d = cfg.data
    data_dir = resolve_data_path(d)
    text_sources, image_sources = ("shakespeare", "text_file"), ("digits", "cifar10", "image_folder")
    if d.source in text_sources or (d.source == "hub" and cfg.model.kind == "gpt"):
        if cfg.model.kind != "gpt":
            raise ConfigError(f"data.source={d.source!r} is text and needs model.kind='gpt', got {cfg.model.kind!r}")
        return _text(d, data_dir)
    if d.source in image_sources and cfg.model.kind != "vit":
        raise ConfigError(f"data.source={d.source!r} is images and needs model.kind='vit', got {cfg.model.kind!r}")
    return _images(d, data_dir)
