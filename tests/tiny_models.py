"""The tiny models of the tests: the product's builders (``megatron_metis.models.tiny``) with
the tests' variations as parameters, offline (configs, no hub), float32.

Two weight treatments make mistakes visible: ``perturb_norms`` (a norm weight or bias left at
its 1/0 init hides a mapping error in it from the logits) and ``spread_matrices`` (the default
init, std 0.02, gives near-uniform next-token distributions, which hide sampling mistakes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_metis.data.tokenizer import build_tiny_tokenizer
from megatron_metis.data.vl_inputs import build_vl_processor
from megatron_metis.models.tiny import (
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    TinyTextSizes,
    build_tiny_qwen2_5_vl,
    init_tiny_model,
    save_tiny_model,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_config,
)


def perturb_norms(model, std: float = 0.1):
    """Add N(0, std) noise to every norm weight (the vision merger's ``ln_q`` too) and bias."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name or "ln_q" in name:
                param.add_(torch.randn_like(param) * std)
    return model


def spread_matrices(model, std: float = 0.3):
    """Redraw every weight matrix from N(0, std)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, std)
    return model


def make_tiny_qwen2(
    out_dir: str | Path,
    *,
    tie_word_embeddings: bool,
    vocab_size: int = 131,
    num_layers: int = 4,
    seed: int = 0,
):
    """Save a Qwen2 (hidden 64, GQA 4 heads / 2 KV heads, perturbed norms) to ``out_dir`` and
    return it. The default vocab (131) is not a multiple of any TP size."""
    config = tiny_qwen2_config(
        vocab_size=vocab_size,
        sizes=TinyTextSizes(hidden_size=64, num_layers=num_layers, max_position_embeddings=64),
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=vocab_size - 1,
    )
    model = perturb_norms(init_tiny_model(config, seed=seed))
    save_tiny_model(model, out_dir)
    return model


def sampling_qwen2(tokenizer, *, seed: int = 0, num_layers: int = 2):
    """An in-memory Qwen2 for ``tokenizer`` (hidden 32, eager attention, spread matrices), for
    sampling and scoring tests: its log-probs are reproducible to 1e-6."""
    config = tiny_qwen2_config(
        vocab_size=len(tokenizer),
        sizes=TinyTextSizes(hidden_size=32, num_layers=num_layers, max_position_embeddings=512),
        attn_implementation="eager",
    )
    return spread_matrices(init_tiny_model(config, seed=seed))


def make_tiny_qwen2_5_vl(out_dir: str | Path, *, seed: int = 0):
    """Save a Qwen2.5-VL (+ tokenizer, image processor) to ``out_dir``; return (model, processor).

    Text: hidden 64, 2 layers, 4 heads / 2 KV heads, M-RoPE sections [2, 3, 3], the tiny
    tokenizer's vocabulary (odd, so TP pads it). Vision: depth 2 (block 0 windowed, block 1 full
    attention), hidden 64, MLP 96. Norm weights and biases are perturbed.
    """
    tokenizer = build_tiny_tokenizer()
    config = tiny_qwen2_5_vl_config(
        tokenizer,
        sizes=TinyTextSizes(hidden_size=64, num_layers=2, max_position_embeddings=512),
        mrope_section=(2, 3, 3),
        vision_intermediate_size=96,
    )
    model = perturb_norms(init_tiny_model(config, seed=seed))
    save_tiny_model(model, out_dir, tokenizer)
    processor = build_vl_processor(
        tokenizer, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS
    )
    return model, processor


def write_tiny_assets(root: Path) -> tuple[str, str]:
    """The trainer and end-to-end tests' run inputs: a small tiny Qwen2.5-VL (hidden 64, 2
    layers) at ``root/hf`` and a 40-problem synthetic dataset at ``root/data``."""
    from megatron_metis.data.synth import write_synthetic_dataset

    hf = build_tiny_qwen2_5_vl(root / "hf", hidden_size=64, num_layers=2)
    write_synthetic_dataset(root / "data", n=40, seed=0)
    return str(hf), str(root / "data")
