"""Validation shared by the blocks' ``load_state_dict``."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def check_shapes(state: Mapping[str, object], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError if a saved tensor's shape is not this block's.

    The same block id can name a block of another shape (state saved before the blocking changed,
    e.g. a (1, T, d) tensor once blocked as 1 x T*d); loading it would fail later, or not at all.
    """
    for key, shape in shapes.items():
        value = state.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(shape):
            raise ValueError(f"saved {key} has shape {tuple(value.shape)}, this block needs {tuple(shape)}")
