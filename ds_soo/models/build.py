"""Pick the model that fits the data: ViT for images, GPT for character streams."""

from __future__ import annotations

import torch
from torch import nn

from ds_soo.config import ConfigError
from ds_soo.data.base import DataBundle
from ds_soo.trainer.config import ModelConfig


class Classifier(nn.Module):
    """Wraps an HF model so that ``forward(batch) -> logits``; the loop owns the loss."""

    def __init__(self, inner: nn.Module, input_key: str, hf_kwarg: str) -> None:
        super().__init__()
        self.net = inner
        self.input_key = input_key
        self.hf_kwarg = hf_kwarg

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(**{self.hf_kwarg: batch[self.input_key]}).logits


def build_model(cfg: ModelConfig, data: DataBundle) -> nn.Module:
    if data.task == "classification":
        if cfg.kind != "vit":
            raise ConfigError(f"model.kind must be 'vit' for image data ({data.name}), got {cfg.kind!r}")
        from ds_soo.models.vit import build_vit

        try:
            inner = build_vit(cfg, data.image_size, data.num_channels, data.num_classes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return Classifier(inner, "pixel_values", "pixel_values")
    if cfg.kind != "gpt":
        raise ConfigError(f"model.kind must be 'gpt' for text data ({data.name}), got {cfg.kind!r}")
    from ds_soo.models.gpt import build_gpt

    return Classifier(build_gpt(cfg, data.vocab_size, data.block_size), "input_ids", "input_ids")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
