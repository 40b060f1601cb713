"""Tiny random Qwen2 / Qwen2.5-VL models for CPU recipes, demos and tests: same classes, small
configs.

``build_tiny_qwen2_5_vl(out_dir)`` writes a Hugging Face folder (config, safetensors, the tiny
tokenizer, the image processor config) that every part of the project loads like a real
Qwen2.5-VL-7B-Instruct folder: the engine (``build_model`` + ``load_hf_weights``), the rollout
engine and transformers itself. Its parts are the builders of every tiny model, the tests'
included: a config (``tiny_qwen2_config``, ``tiny_qwen2_5_vl_config``; the text model's sizes in
``TinyTextSizes``), a random float32 model of it (``init_tiny_model``), and a folder
(``save_tiny_model``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TINY_MIN_PIXELS = 56 * 56
"""Smart-resize bounds of the tiny recipes: small images keep the image-token count low."""
TINY_MAX_PIXELS = 112 * 112


@dataclass(frozen=True, kw_only=True)
class TinyTextSizes:
    """Sizes of a tiny Qwen2 text model (alone, or the decoder of a tiny Qwen2.5-VL)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    """Query heads; head dim ``hidden_size / num_heads``, which must be even (RoPE)."""
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096

    def fields(
        self,
        *,
        vocab_size: int,
        mrope_section: Sequence[int] | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> dict[str, Any]:
        """The HF text-config fields: SwiGLU width 2 * hidden, RMSNorm eps 1e-6, RoPE theta
        1e4 (M-RoPE with ``mrope_section``), no BOS token."""
        head_dim, rest = divmod(self.hidden_size, self.num_heads)
        if rest or head_dim % 2:
            raise ValueError(
                f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be an even dim"
            )
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 1e4}
        if mrope_section is not None:
            rope["mrope_section"] = list(mrope_section)
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": 2 * self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "bos_token_id": None,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
        }


def tiny_qwen2_config(
    *,
    vocab_size: int,
    sizes: TinyTextSizes = TinyTextSizes(),
    tie_word_embeddings: bool = False,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    attn_implementation: str | None = None,
):
    """A tiny Qwen2 (text) ``Qwen2Config``; ``attn_implementation`` None is transformers'
    default."""
    from transformers import Qwen2Config

    fields = sizes.fields(
        vocab_size=vocab_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    return Qwen2Config(
        **fields, tie_word_embeddings=tie_word_embeddings, attn_implementation=attn_implementation
    )


def tiny_qwen2_5_vl_config(
    tokenizer,
    *,
    sizes: TinyTextSizes = TinyTextSizes(),
    mrope_section: Sequence[int] | None = None,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vision_intermediate_size: int | None = None,
):
    """A tiny ``Qwen2_5_VLConfig`` for ``tokenizer`` (the tiny one: its vocabulary and special
    tokens).

    Text model: ``sizes``, M-RoPE sections ``mrope_section`` (default: the rotary
    half-dimension split as evenly as possible, the temporal part largest), untied embeddings,
    EOS ``<|im_end|>``. Vision tower: ``vision_depth`` blocks (the last one full attention, the
    others windowed), patch 14, 2x2 merge into the text width, MLP width
    ``vision_intermediate_size`` (default 2 * ``vision_hidden_size``).
    """
    from transformers import Qwen2_5_VLConfig

    if mrope_section is None:
        half = sizes.hidden_size // sizes.num_heads // 2
        mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
    text = sizes.fields(
        vocab_size=len(tokenizer),
        mrope_section=mrope_section,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": (
            2 * vision_hidden_size if vision_intermediate_size is None else vision_intermediate_size
        ),
        "num_heads": 4,
        "out_hidden_size": sizes.hidden_size,
        "window_size": 56,
        "fullatt_block_indexes": [vision_depth - 1],
    }
    token_id = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def init_tiny_model(config, *, seed: int = 0):
    """A randomly initialised float32 model of ``config`` in eval mode: ``Qwen2ForCausalLM``
    or ``Qwen2_5_VLForConditionalGeneration``; the weights depend on ``seed`` only."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {Qwen2Config: Qwen2ForCausalLM, Qwen2_5_VLConfig: Qwen2_5_VLForConditionalGeneration}
    torch.manual_seed(seed)
    model = classes[type(config)](config).float().eval()
    if isinstance(config, Qwen2_5_VLConfig):  # generate() reads these, not the text config's
        text = config.text_config
        model.generation_config.bos_token_id = text.bos_token_id
        model.generation_config.eos_token_id = text.eos_token_id
        model.generation_config.pad_token_id = text.pad_token_id
    return model


def save_tiny_model(model, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``model`` as a Hugging Face folder at ``out_dir``, with ``tokenizer`` if given, and
    for a vision-language model the image processor config of the tiny pixel bounds."""
    from megatron_metis.data.vl_inputs import build_vl_processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if tokenizer is not None and hasattr(model.config, "vision_config"):
        processor = build_vl_processor(
            tokenizer, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS
        )
        # ProcessorMixin.save_pretrained needs a video processor: save the image part alone.
        processor.image_processor.save_pretrained(out)
    return out


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Create a float32 tiny Qwen2.5-VL HF folder at ``out_dir`` (kept if it already exists):
    ``tiny_qwen2_5_vl_config`` of ``hidden_size`` and ``num_layers``, the tiny tokenizer.

    Returns:
        The folder.
    """
    from megatron_metis.data.tokenizer import build_tiny_tokenizer

    out = Path(out_dir)
    if (out / "config.json").exists() and not overwrite:
        return out
    tok = build_tiny_tokenizer()
    sizes = TinyTextSizes(hidden_size=hidden_size, num_layers=num_layers)
    config = tiny_qwen2_5_vl_config(tok, sizes=sizes)
    save_tiny_model(init_tiny_model(config, seed=seed), out, tok)
    (out / "metis_tiny.json").write_text(
        json.dumps({"hidden_size": hidden_size, "num_layers": num_layers, "seed": seed}) + "\n"
    )
    return out
