"""Tiny randomly initialised Hugging Face models, built offline from configs, for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def make_tiny_qwen2(
    out_dir: str | Path,
    *,
    tie_word_embeddings: bool,
    vocab_size: int = 131,
    num_layers: int = 4,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """Save a float32 Qwen2 with GQA (4 heads, 2 KV heads) to ``out_dir`` and return it.

    Norm weights and biases are perturbed away from their 1/0 init so that a mapping error in
    them shows up in the logits. The default vocab (131) is not a multiple of any TP size.
    """
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=vocab_size - 1,
        pad_token_id=None,
    )
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir)
    return model
