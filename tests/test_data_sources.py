"""Each data source yields what the trainer expects, deterministically, from the shared data files
(``DS_SOO_DATA``/``--data-path``) or from files the test makes; offline hub access fails clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_soo.config import ConfigError
from ds_soo.data import CharData, ImageData, build_data
from ds_soo.trainer.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _cfg(*overrides: str):
    return load_config(None, ["train.epochs=1", *overrides])


def test_digits_split_is_stratified_and_fixed():
    data = build_data(_cfg("data.source=digits"))
    assert isinstance(data, ImageData)
    assert (data.num_train, data.num_eval) == (1437, 360)
    assert tuple(data.train_x.shape[1:]) == (1, 8, 8) and data.train_x.dtype == torch.uint8
    assert torch.bincount(data.eval_y).tolist() == pytest.approx([36] * 10, abs=1)
    again = build_data(_cfg("data.source=digits"))
    assert torch.equal(data.train_x, again.train_x) and torch.equal(data.eval_y, again.eval_y)
    batch = next(data.train_batches(512, seed=0))
    assert batch["pixel_values"].shape == (512, 1, 8, 8) and batch["labels"].shape == (512,)
    assert abs(float(batch["pixel_values"].mean())) < 0.2, "pixels are normalized with train statistics"


def test_image_epochs_cover_each_example_once_and_drop_the_tail():
    data = build_data(_cfg("data.source=digits", "data.train_size=100", "data.eval_size=30"))
    assert (data.num_train, data.num_eval) == (100, 30)
    assert data.steps_per_epoch(32) == 3
    it = data.train_batches(32, seed=1)
    seen = torch.cat([next(it)["labels"] for _ in range(3)])
    assert len(seen) == 96
    assert sum(len(b["labels"]) for b in data.eval_batches(8)) == 30


def test_shakespeare_char_stream(require_data):
    require_data("tinyshakespeare.txt")
    data = build_data(_cfg("data.source=shakespeare", "model.kind=gpt", "data.block_size=32", "data.eval_fraction=0.1"))
    assert isinstance(data, CharData)
    assert data.vocab_size == 65
    assert len(data.train_tokens) == int(0.9 * 1_115_394)
    assert len(data.train_tokens) + len(data.eval_tokens) == 1_115_394
    assert "".join(data.vocab[i] for i in data.train_tokens[:14]) == "First Citizen:"
    a, b = next(data.train_batches(8, seed=3)), next(data.train_batches(8, seed=3))
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape == (8, 32)
    assert torch.equal(a["input_ids"][:, 1:], a["labels"][:, :-1]), "labels are inputs shifted by one"
    assert data.steps_per_epoch(8) == len(data.train_tokens) // (8 * 32)


def test_text_file_source(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh" * 200, encoding="utf-8")
    data = build_data(_cfg("data.source=text_file", f"data.file={text}", "model.kind=gpt", "data.block_size=16"))
    assert data.vocab == "abcdefgh" and data.vocab_size == 8
    batch = next(data.eval_batches(4))
    assert batch["input_ids"].shape == (4, 16)


def test_text_file_too_short_names_block_size(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("short", encoding="utf-8")
    with pytest.raises(ConfigError, match="data.block_size"):
        build_data(_cfg("data.source=text_file", f"data.file={text}", "model.kind=gpt"))


def test_cifar10_subset_decodes(require_data, tmp_path, monkeypatch):
    require_data("cifar10_jpeg_q75.npz")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a subset never writes the full cache
    data = build_data(_cfg("data.source=cifar10", "data.train_size=300", "data.eval_size=50"))
    assert (data.num_train, data.num_eval, data.num_classes) == (300, 50, 10)
    assert tuple(data.train_x.shape[1:]) == (3, 32, 32)
    assert len(torch.unique(data.train_y)) == 10, "the class-sorted file must be shuffled before subsetting"
    assert data.mean.flatten().tolist() == pytest.approx([125.3, 122.9, 113.9], abs=8)
    assert not (tmp_path / "ds_soo").exists()


def test_image_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    data = build_data(_cfg("data.source=image_folder", f"data.file={tmp_path / 'imgs'}", "data.image_size=8"))
    assert data.num_classes == 2 and data.num_train + data.num_eval == 12
    assert tuple(data.train_x.shape[1:]) == (3, 8, 8)


def test_missing_text_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.file"):
        _cfg("data.source=text_file", f"data.file={tmp_path / 'none.txt'}", "model.kind=gpt")


def test_hub_offline_fails_clearly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ds_soo.train", "--out", str(out), "data.source=hub", "data.name=ds-soo-none/x",
         "train.epochs=null", "train.steps=1"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "data.name: could not load 'ds-soo-none/x'" in proc.stderr and "network" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["train.log"]


def _fake_cifar(path: Path, n: int) -> np.ndarray:
    """An npz in the shared file's layout (JPEG bytes + offsets), sorted by class like the real one."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    blobs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    labels = np.sort(rng.integers(0, 10, n)).astype(np.uint8)
    arrays = {}
    for split in ("train", "test"):
        arrays |= {f"{split}_jpeg": np.concatenate(blobs), f"{split}_offsets": offsets, f"{split}_labels": labels}
    np.savez(path, **arrays)
    return labels


def test_cifar10_full_decode_is_cached_and_reused(tmp_path, monkeypatch):
    from ds_soo.data import cifar10

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / cifar10.FILE
    labels = _fake_cifar(src, 12)
    x1, y1 = cifar10.load_split(src, "train", None, seed=0)
    cached = list((tmp_path / "cache" / "ds_soo").glob("cifar10_q75_train_*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (12, 32, 32, 3)
    monkeypatch.setattr(cifar10, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    x2, y2 = cifar10.load_split(src, "train", 5, seed=0)
    assert np.array_equal(x2, x1[:5]) and np.array_equal(y2, y1[:5])
    assert sorted(y1.tolist()) == sorted(labels.tolist())
