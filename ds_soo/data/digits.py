"""scikit-learn's digits (1797 8x8 images, shipped inside the wheel): a real dataset needing no files."""

from __future__ import annotations

import numpy as np

from ds_soo.data.base import dataset_to_arrays, images_to_dataset
from ds_soo.data.config import DataConfig


def load_digits_datasets(cfg: DataConfig):
    """Stratified, seeded train/test split as two ``datasets.Dataset`` (pixels 0..16 as uint8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = d.images.astype(np.uint8)[..., None]
    xtr, xte, ytr, yte = train_test_split(
        images, d.target, test_size=cfg.eval_fraction, random_state=cfg.seed, stratify=d.target
    )
    return images_to_dataset(xtr, ytr), images_to_dataset(xte, yte)


def load_digits_arrays(cfg: DataConfig):
    train, test = load_digits_datasets(cfg)
    return dataset_to_arrays(train, (8, 8, 1)), dataset_to_arrays(test, (8, 8, 1))
