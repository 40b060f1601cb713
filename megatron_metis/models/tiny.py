"""A tiny random Qwen2.5-VL for CPU recipes, demos and tests: same classes, small config.

``build_tiny_qwen2_5_vl(out_dir)`` writes a Hugging Face folder (config, safetensors, the tiny
tokenizer, the image processor config) that every part of the project loads like a real
Qwen2.5-VL-7B-Instruct folder: the engine (``build_model`` + ``load_hf_weights``), the rollout
engine and transformers itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_MIN_PIXELS = 56 * 56
"""Smart-resize bounds of the tiny recipes: small images keep the image-token count low."""
TINY_MAX_PIXELS = 112 * 112


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Create a float32 tiny Qwen2.5-VL HF folder at ``out_dir`` (kept if it already exists).

    Text model: ``hidden_size``, ``num_layers``, GQA ``num_heads`` / ``num_kv_heads``, head dim
    ``hidden_size / num_heads`` with M-RoPE sections summing to half of it, vocab = the tiny
    tokenizer's size. Vision tower: ``vision_depth`` blocks (the last one full attention, the
    others windowed), patch 14, 2x2 merge into the text width.

    Returns:
        The folder.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_metis.data.tokenizer import build_tiny_tokenizer
    from megatron_metis.data.vl_inputs import build_vl_processor

    out = Path(out_dir)
    if (out / "config.json").exists() and not overwrite:
        return out
    head_dim = hidden_size // num_heads
    if head_dim % 2 or hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} must be an even dim")
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    tok = build_tiny_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e4},
            "bos_token_id": None,
            "eos_token_id": im_end,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_heads": 4,
            "out_hidden_size": hidden_size,
            "window_size": 56,
            "fullatt_block_indexes": [vision_depth - 1],
        },
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    processor = build_vl_processor(tok, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    # ProcessorMixin.save_pretrained needs a video processor: save the image part alone.
    processor.image_processor.save_pretrained(out)
    (out / "metis_tiny.json").write_text(
        json.dumps({"hidden_size": hidden_size, "num_layers": num_layers, "seed": seed}) + "\n"
    )
    return out
