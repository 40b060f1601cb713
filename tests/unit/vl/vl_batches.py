"""A tiny random Qwen2.5-VL built with transformers from a config, and its test batches."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from megatron_metis.data.schema import Problem
from megatron_metis.data.tokenizer import build_tiny_tokenizer
from megatron_metis.data.vl_inputs import VLBatch, build_vl_processor, encode_problems

MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112


def make_tiny_qwen2_5_vl(out_dir: str | Path, *, seed: int = 0):
    """Save a float32 tiny Qwen2.5-VL (+ tokenizer, processor) to ``out_dir``; return (model, proc).

    Text: hidden 64, 2 layers, 4 heads / 2 KV heads, M-RoPE sections [2, 3, 3], vocab 671 (odd,
    so TP pads it). Vision: depth 2 (block 0 windowed, block 1 full attention), hidden 64.
    Norm weights and biases are perturbed so that a mapping error shows in the logits.
    """
    tok = build_tiny_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 512,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "rope_theta": 1e4,
            },
            "bos_token_id": None,
            "eos_token_id": im_end,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_heads": 4,
            "out_hidden_size": 64,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name or "ln_q" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    processor = build_vl_processor(tok, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    # ProcessorMixin.save_pretrained needs a video processor: save the two parts instead.
    tok.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    return model, processor


def _png(size: tuple[int, int], seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def build_batches(processor) -> dict[str, VLBatch]:
    """``mixed``: image+text, two images+text, text-only, image+text (right-padded);
    ``text``: two text-only samples (no pixel values at all)."""
    mixed = [
        Problem(
            id="one_image",
            question="How many red shapes?",
            answer="1",
            images=(_png((100, 80), 1),),
        ),
        Problem(
            id="two_images",
            question="Which bar is longer?",
            answer="A",
            images=(_png((60, 90), 2), _png((112, 56), 3)),
        ),
        Problem(id="text_only", question="Compute 3 + 4.", answer="7"),
        Problem(
            id="square", question="What number is shown?", answer="5", images=(_png((70, 70), 4),)
        ),
    ]
    text = [
        Problem(id="t1", question="Solve for x: 3x + 4 = 19.", answer="5"),
        Problem(id="t2", question="Compute 12 * 7.", answer="84"),
    ]
    encode = lambda ps: encode_problems(  # noqa: E731
        processor, ps, system_prompt="You are a careful solver.", padding_side="right"
    )
    return {"mixed": encode(mixed), "text": encode(text)}


def hf_logits(model, batch: VLBatch) -> torch.Tensor:
    """Reference logits [B, S, V] of transformers' own model."""
    with torch.no_grad():
        return model(
            input_ids=batch.input_ids_BS,
            attention_mask=batch.attention_mask_BS,
            pixel_values=batch.pixel_values_PC,
            image_grid_thw=batch.image_grid_thw_N3,
            mm_token_type_ids=batch.mm_token_type_ids_BS,
        ).logits
