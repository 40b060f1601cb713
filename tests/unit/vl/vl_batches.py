"""The Qwen2.5-VL tests' batches (images and text, through the project's processor) and
transformers' reference logits of them."""

from __future__ import annotations

import io

import torch
from PIL import Image

from megatron_metis.data.schema import Problem
from megatron_metis.data.vl_inputs import VLBatch, encode_problems


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
