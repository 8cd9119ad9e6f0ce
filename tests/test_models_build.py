"""Models come from configs alone (no hub), fit the data they are given, and reject a mismatch."""

from __future__ import annotations

import pytest
import torch

from ds_soo.config import ConfigError
from ds_soo.data import build_data
from ds_soo.models import build_model, count_parameters
from ds_soo.trainer.config import load_config


def test_vit_for_digits_sizes_follow_the_config():
    cfg = load_config(None, ["train.epochs=1", "model.hidden_size=32", "model.num_layers=3", "model.patch_size=4"])
    data = build_data(cfg)
    model = build_model(cfg.model, data)
    inner = model.net.config
    assert (inner.hidden_size, inner.num_hidden_layers, inner.image_size, inner.num_channels) == (32, 3, 8, 1)
    assert inner.intermediate_size == 64 and inner.num_labels == 10
    logits = model(next(data.train_batches(4, seed=0)))
    assert logits.shape == (4, 10)


def test_char_gpt_from_a_text_file(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 100, encoding="utf-8")
    cfg = load_config(None, ["train.epochs=1", "data.source=text_file", f"data.file={text}", "model.kind=gpt",
                             "data.block_size=16", "model.hidden_size=32", "model.num_layers=1"])  # fmt: skip
    data = build_data(cfg)
    model = build_model(cfg.model, data)
    assert model.net.config.vocab_size == len(set("hello world ")) and model.net.config.n_positions == 16
    assert model.net.lm_head.weight is not model.net.transformer.wte.weight, "untied by default"
    batch = next(data.train_batches(2, seed=0))
    assert model(batch).shape == (2, 16, data.vocab_size)
    assert count_parameters(model) > 0


def test_tied_embeddings_option(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abc " * 100, encoding="utf-8")
    cfg = load_config(None, ["train.epochs=1", "data.source=text_file", f"data.file={text}", "model.kind=gpt",
                             "data.block_size=8", "model.hidden_size=16", "model.num_layers=1",
                             "model.tie_embeddings=true"])  # fmt: skip
    model = build_model(cfg.model, build_data(cfg))
    assert model.net.lm_head.weight is model.net.transformer.wte.weight


def test_model_data_mismatch_is_a_config_error():
    cfg = load_config(None, ["train.epochs=1", "model.kind=gpt"])
    with pytest.raises(ConfigError, match="needs model.kind='vit'"):
        build_data(cfg)


def test_patch_size_must_divide_image():
    cfg = load_config(None, ["train.epochs=1", "model.patch_size=3"])
    with pytest.raises(ConfigError, match="model.patch_size"):
        build_model(cfg.model, build_data(cfg))


def test_deterministic_init():
    cfg = load_config(None, ["train.epochs=1"])
    data = build_data(cfg)
    torch.manual_seed(0)
    a = build_model(cfg.model, data)
    torch.manual_seed(0)
    b = build_model(cfg.model, data)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
