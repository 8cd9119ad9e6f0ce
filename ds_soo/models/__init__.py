"""Models built from configs only (no hub download): a small ViT and a char-level GPT."""

from ds_soo.models.build import build_model, count_parameters

__all__ = ["build_model", "count_parameters"]
