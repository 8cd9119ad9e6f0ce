"""In-memory training data with the two shapes the trainer needs: labelled images and a character
stream. Sources (digits, CIFAR-10, text files, the hub) only have to produce one of these.

Images stay uint8 and are normalized per batch, so 50k CIFAR images cost 150 MB rather than 600 MB.
Batching indexes tensors directly: at these sizes a DataLoader's per-sample collation costs more than
the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]


def images_to_dataset(images: np.ndarray, labels: np.ndarray) -> Any:
    """(N, H, W, C) uint8 + labels -> ``datasets.Dataset``, the exchange format between sources."""
    import datasets

    n = len(images)
    return datasets.Dataset.from_dict({"pixels": images.reshape(n, -1), "label": labels.astype(np.int64)})


def dataset_to_arrays(ds: Any, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`images_to_dataset`: (N, H, W, C) uint8 and int64 labels."""
    cols = ds.with_format("numpy")[:]
    return cols["pixels"].astype(np.uint8).reshape(-1, *shape), cols["label"].astype(np.int64)


class ImageData:
    """Labelled images for classification; shuffled epochs without replacement, last partial batch
    dropped so every optimizer step sees the configured batch size (curvature damping depends on it)."""

    task = "classification"

    def __init__(
        self, name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], num_classes: int
    ) -> None:
        self.name = name
        self.num_classes = num_classes
        self.train_x, self.train_y = self._to_tensors(*train)
        self.eval_x, self.eval_y = self._to_tensors(*test)
        _, self.num_channels, self.image_size, _ = self.train_x.shape
        pixels = self.train_x.double().transpose(0, 1).reshape(self.num_channels, -1)
        self.mean = pixels.mean(1).float().view(1, -1, 1, 1)
        self.std = pixels.std(1).clamp_min(1e-6).float().view(1, -1, 1, 1)

    @staticmethod
    def _to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim == 3:
            x = x[..., None]
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"images must be square, got {x.shape[1]}x{x.shape[2]}")
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y).long()

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    @property
    def num_eval(self) -> int:
        return len(self.eval_y)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.num_train // batch_size

    def _batch(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        return {"pixel_values": (x.float() - self.mean) / self.std, "labels": y}

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        if batch_size > self.num_train:
            raise ValueError(f"train.batch_size ({batch_size}) exceeds the {self.num_train} training images")
        gen = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(self.num_train, generator=gen)
            for i in range(self.steps_per_epoch(batch_size)):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                yield self._batch(self.train_x[idx], self.train_y[idx])

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, self.num_eval, batch_size):
            yield self._batch(self.eval_x[i : i + batch_size], self.eval_y[i : i + batch_size])

    @staticmethod
    def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    @staticmethod
    def correct(logits: torch.Tensor, batch: Batch) -> int:
        return int((logits.argmax(-1) == batch["labels"]).sum())

    @staticmethod
    def count(batch: Batch) -> int:
        return len(batch["labels"])


class CharData:
    """A character stream for next-character prediction: random training windows drawn with a seeded
    generator, and fixed evaluation windows spread evenly over the held-out text."""

    task = "lm"

    def __init__(
        self, name: str, text: str, eval_fraction: float, block_size: int, eval_windows: int, train_size: int | None
    ) -> None:
        self.name = name
        self.vocab = "".join(sorted(set(text)))
        self.vocab_size = len(self.vocab)
        self.block_size = block_size
        lookup = np.zeros(max(map(ord, self.vocab)) + 1, dtype=np.int64)
        lookup[[ord(c) for c in self.vocab]] = np.arange(self.vocab_size)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        tokens = torch.from_numpy(lookup[codes])
        n = int((1.0 - eval_fraction) * len(tokens))
        self.train_tokens = tokens[: n if train_size is None else min(n, train_size)]
        self.eval_tokens = tokens[n:]
        for split, toks in (("training", self.train_tokens), ("evaluation", self.eval_tokens)):
            if len(toks) <= block_size + 1:
                raise ValueError(f"the {split} text ({len(toks)} chars) is shorter than data.block_size + 2")
        last = len(self.eval_tokens) - block_size - 1
        self.eval_starts = torch.linspace(0, last, min(eval_windows, last + 1)).long()

    @property
    def num_train(self) -> int:
        return len(self.train_tokens)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.num_train // (batch_size * self.block_size))

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> Batch:
        w = tokens[starts[:, None] + torch.arange(self.block_size + 1)]
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        high = self.num_train - self.block_size - 1
        while True:
            yield self._windows(self.train_tokens, torch.randint(0, high + 1, (batch_size,), generator=gen))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, len(self.eval_starts), batch_size):
            yield self._windows(self.eval_tokens, self.eval_starts[i : i + batch_size])

    @staticmethod
    def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())

    @staticmethod
    def correct(logits: torch.Tensor, batch: Batch) -> int:
        return int((logits.argmax(-1) == batch["labels"]).sum())

    @staticmethod
    def count(batch: Batch) -> int:
        return batch["labels"].numel()


DataBundle = ImageData | CharData
