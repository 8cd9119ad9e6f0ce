"""A small ViT classifier from ``transformers.ViTConfig``; sizes come from the trainer config."""

from __future__ import annotations

from transformers import ViTConfig, ViTForImageClassification

from ds_soo.trainer.config import ModelConfig


def build_vit(cfg: ModelConfig, image_size: int, num_channels: int, num_classes: int) -> ViTForImageClassification:
    if image_size % cfg.patch_size:
        raise ValueError(f"model.patch_size ({cfg.patch_size}) must divide the image size ({image_size})")
    config = ViTConfig(
        image_size=image_size,
        patch_size=cfg.patch_size,
        num_channels=num_channels,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size or 2 * cfg.hidden_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        num_labels=num_classes,
    )
    return ViTForImageClassification(config)
