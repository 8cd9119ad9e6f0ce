"""A char-level GPT from ``transformers.GPT2Config``; the vocabulary is the corpus's character set."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel

from ds_soo.trainer.config import ModelConfig


def build_gpt(cfg: ModelConfig, vocab_size: int, block_size: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size or 4 * cfg.hidden_size,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)
