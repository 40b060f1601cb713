"""Tiny offline Qwen2 models and the tiny tokenizer for the rollout tests."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from megatron_metis.data.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def make_tiny_qwen2(vocab_size: int, seed: int) -> Qwen2ForCausalLM:
    """A 2-layer fp32 Qwen2 with random weights drawn from ``seed``."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # the default init (std 0.02) gives near-uniform outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture()
def tiny_model_factory(tiny_tokenizer):
    return lambda seed=0: make_tiny_qwen2(len(tiny_tokenizer), seed)
