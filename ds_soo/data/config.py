"""What the data sources read: :class:`DataConfig` and where the shared data directory is.

It sits below the trainer (the trainer's config embeds it) so that loading data never imports the trainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ds_soo.config import ConfigError

DATA_ENV = "DS_SOO_DATA"
DataSource = Literal["digits", "cifar10", "shakespeare", "image_folder", "text_file", "hub", "npz"]


@dataclass
class DataConfig:
    """Where examples come from. ``path`` is the shared data directory (default: $DS_SOO_DATA)."""

    source: DataSource = "digits"
    path: str | None = None
    # text_file: any text file; image_folder: a directory for datasets' imagefolder builder; npz: an
    # arrays file (see ds_soo.data.npz for its keys).
    file: str | None = None
    # hub: a datasets.load_dataset name, its config, and the column names to read.
    name: str | None = None
    hub_config: str | None = None
    # None = the first column of type Image / ClassLabel (imagefolder gives "image", hub cifar10 "img").
    image_column: str | None = None
    label_column: str | None = None
    text_column: str = "text"
    train_split: str = "train"
    eval_split: str | None = "test"
    # Subsets (None = all) for speed: images taken after a seeded shuffle; for text, the number of
    # leading training characters.
    train_size: int | None = None
    eval_size: int | None = None
    # Fraction held out when the source has no eval split (digits, text).
    eval_fraction: float = 0.2
    image_size: int | None = None
    block_size: int = 64
    # Language modelling: number of eval windows (fixed by seed).
    eval_windows: int = 256
    seed: int = 0


def resolve_data_path(d: DataConfig) -> Path | None:
    """The shared data directory for sources that need one: ``data.path``, else ``$DS_SOO_DATA``.

    There is no built-in default: where a user keeps data is theirs to say, and a guessed directory
    would turn a missing file into a confusing error far from its cause. Errors name both options.
    """
    needs = {"cifar10": "cifar10_jpeg_q75.npz", "shakespeare": "tinyshakespeare.txt"}
    if d.source in ("text_file", "image_folder", "npz"):
        if d.file is None:
            raise ConfigError(f"data.file must be set for data.source={d.source!r}")
        if not Path(d.file).exists():
            raise ConfigError(f"data.file: {d.file} does not exist")
        return None
    if d.source == "hub" and d.name is None:
        raise ConfigError("data.name must be set for data.source='hub' (a datasets.load_dataset name)")
    if d.source not in needs:
        return None
    where = d.path or os.environ.get(DATA_ENV)
    if not where:
        raise ConfigError(
            f"data.path is not set and ${DATA_ENV} is empty: data.source={d.source!r} needs "
            f"{needs[d.source]}; pass data.path=DIR or export {DATA_ENV}=DIR"
        )
    origin = "data.path" if d.path else f"data.path (from ${DATA_ENV})"
    file = Path(where) / needs[d.source]
    if not file.is_file():
        raise ConfigError(f"{origin}: {file} does not exist")
    return Path(where)
