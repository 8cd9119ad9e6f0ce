"""Sources for online users: a local image folder (datasets' ``imagefolder`` builder) and any dataset
on the Hugging Face hub. Offline they fail with a message naming the option and the reason."""

from __future__ import annotations

from typing import Any

import numpy as np

from ds_soo.config import ConfigError
from ds_soo.data.base import images_to_dataset
from ds_soo.data.config import DataConfig


def _load(field: str, what: str, *args: Any, **kwargs: Any):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure (network, missing builder) becomes one clear message
        raise ConfigError(
            f"{field}: could not load {what} with datasets.load_dataset ({type(e).__name__}: {e}). "
            "Hub datasets need network access; offline, use data.source=image_folder or text_file "
            "with a local copy."
        ) from None


def _split(dd: Any, name: str | None, field: str):
    if name is None:
        return None
    if name not in dd:
        raise ConfigError(f"{field}: split {name!r} not found; available: {sorted(dd)}")
    return dd[name]


def _column(ds: Any, wanted: str | None, kind: str, field: str, fallback: str | None = None) -> str:
    """The named column, else the first one whose feature type is ``kind`` (Image, ClassLabel)."""
    if wanted is None:
        typed = [n for n, f in ds.features.items() if type(f).__name__ == kind]
        wanted = typed[0] if typed else fallback
    if wanted is None or wanted not in ds.column_names:
        raise ConfigError(f"{field}: no {kind} column {wanted!r}; columns: {ds.column_names}")
    return wanted


def _images(ds: Any, cfg: DataConfig, size: int | None) -> tuple[Any, int]:
    """Decode an image/label dataset to fixed-size RGB-or-gray arrays (resized to ``size``)."""
    image_col = _column(ds, cfg.image_column, "Image", "data.image_column")
    label_col = _column(ds, cfg.label_column, "ClassLabel", "data.label_column", fallback="label")
    first = ds[0][image_col]
    side = size or max(first.size)
    mode = "L" if first.mode in ("L", "1", "I", "I;16") else "RGB"
    images = np.stack([np.asarray(im.convert(mode).resize((side, side))) for im in ds[image_col]])
    labels = np.asarray(ds[label_col], dtype=np.int64)
    if images.ndim == 3:
        images = images[..., None]
    return images_to_dataset(images, labels), side


def _num_classes(train: Any, test: Any, cfg: DataConfig) -> int:
    col = _column(train, cfg.label_column, "ClassLabel", "data.label_column", fallback="label")
    feat = train.features[col]
    if getattr(feat, "num_classes", None):
        return int(feat.num_classes)
    return int(max(max(train[col]), max(test[col])) + 1)


def load_image_source(cfg: DataConfig):
    """(train Dataset, eval Dataset, num_classes, side) from an image folder or a hub dataset."""
    if cfg.source == "image_folder":
        dd = _load("data.file", f"image folder {cfg.file}", "imagefolder", data_dir=cfg.file)
    else:
        dd = _load("data.name", repr(cfg.name), cfg.name, cfg.hub_config)
    train = _split(dd, cfg.train_split, "data.train_split")
    test = _split(dd, cfg.eval_split, "data.eval_split") if cfg.eval_split in dd else None
    if test is None:
        parts = train.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        train, test = parts["train"], parts["test"]
    if cfg.train_size is not None:
        train = train.shuffle(seed=cfg.seed).select(range(min(cfg.train_size, len(train))))
    if cfg.eval_size is not None:
        test = test.shuffle(seed=cfg.seed + 1).select(range(min(cfg.eval_size, len(test))))
    num_classes = _num_classes(train, test, cfg)
    train_ds, side = _images(train, cfg, cfg.image_size)
    test_ds, _ = _images(test, cfg, side)
    return train_ds, test_ds, num_classes, side


def load_hub_text(cfg: DataConfig) -> str:
    """All text of the train split joined by newlines (the char model splits it 90/10 itself)."""
    dd = _load("data.name", repr(cfg.name), cfg.name, cfg.hub_config)
    train = _split(dd, cfg.train_split, "data.train_split")
    if cfg.text_column not in train.column_names:
        raise ConfigError(f"data.text_column: no column {cfg.text_column!r} (columns: {train.column_names})")
    return "\n".join(train[cfg.text_column])
