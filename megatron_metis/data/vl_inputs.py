"""Qwen2.5-VL model inputs: chat prompt + images -> token ids, pixel patches, image grids.

Images go through transformers' Qwen2.5-VL image processor (smart resize between
``min_pixels`` and ``max_pixels``, 14x14 patches, 2x2 merge); prompts through the tokenizer's chat
template with the system prompt. The image processor is transformers' default for Qwen2.5-VL
(its torchvision backend), the one vLLM's processor loads, so the trainer sees the pixels the
rollout engine saw: the PIL backend resizes differently (a random 100x70 image resized to 112x56
differs by up to 0.25 in normalised pixel values between the two backends).
``Qwen2_5_VLProcessor`` is subclassed so that it accepts no video processor (no model here
reads video).

Every problem is checked before the processor sees it, and errors name the sample: images that
cannot be decoded, extreme aspect ratios, and a number of ``<|image_pad|>`` placeholders in the
prompt that differs from the number of images.

Shape legend: ``B`` samples, ``S`` tokens, ``P`` patches of all images, ``C`` values per patch
(3 * 2 * 14 * 14 = 1176), ``N`` images of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from megatron_metis.data.messages import build_messages, render_prompt, smart_resize
from megatron_metis.data.schema import ImageSource, Problem, open_image

IMAGE_PAD = "<|image_pad|>"


class VLInputError(ValueError):
    """A sample cannot be turned into model inputs; the message names the sample."""

    def __init__(self, sample_id: str, reason: str) -> None:
        super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


class _Processor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` that accepts ``video_processor=None`` (images only)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def build_vl_processor(
    tokenizer: PreTrainedTokenizerBase, *, min_pixels: int, max_pixels: int
) -> Qwen2_5_VLProcessor:
    """A Qwen2.5-VL processor (images only) around ``tokenizer``.

    Args:
        min_pixels / max_pixels: smart-resize bounds (``DataConfig.image_min_pixels`` /
            ``image_max_pixels``; the paper uses 128*28*28 and 16384*28*28).
    """
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return _Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


@dataclass(frozen=True, kw_only=True)
class VLPrompt:
    """One sample: its id (for errors), the chat-templated text, and its images in order."""

    sample_id: str
    text: str
    """One ``<|image_pad|>`` per image, as the chat template writes it."""
    images: Sequence[ImageSource | Image.Image] = field(default_factory=tuple)


@dataclass(frozen=True)
class VLBatch:
    """Model inputs of a batch; images of all samples are concatenated in sample order."""

    sample_ids: tuple[str, ...]
    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    """1 for tokens, 0 for padding."""
    mm_token_type_ids_BS: torch.Tensor
    """0 text, 1 image (what transformers' ``get_rope_index`` reads)."""
    pixel_values_PC: torch.Tensor | None
    image_grid_thw_N3: torch.Tensor | None
    """(t, h, w) patch grid of each image; None when no sample has an image."""


def _decode_images(prompt: VLPrompt, min_pixels: int, max_pixels: int) -> list[Image.Image]:
    """The prompt's images as RGB PIL images; checks the placeholder count and aspect ratios."""
    n_pads = prompt.text.count(IMAGE_PAD)
    if n_pads != len(prompt.images):
        raise VLInputError(
            prompt.sample_id,
            f"the prompt has {n_pads} {IMAGE_PAD} placeholders but {len(prompt.images)} images",
        )
    images = []
    for k, src in enumerate(prompt.images):
        try:
            image = src.convert("RGB") if isinstance(src, Image.Image) else open_image(src)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            where = src if isinstance(src, str) else f"{type(src).__name__} data"
            raise VLInputError(
                prompt.sample_id, f"image {k} ({where}) is unreadable: {err}"
            ) from err
        try:
            smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
        except ValueError as err:
            raise VLInputError(prompt.sample_id, f"image {k}: {err}") from err
        images.append(image)
    return images


def encode_prompts(
    processor: Qwen2_5_VLProcessor,
    prompts: Sequence[VLPrompt],
    *,
    padding_side: Literal["left", "right"] = "right",
) -> VLBatch:
    """Tokenise and process a batch of prompts (text-only and image samples may be mixed).

    Raises:
        VLInputError: an image is unreadable or too elongated, or a prompt's placeholders and
            images do not agree; names the sample.
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    size = processor.image_processor.size
    min_pixels, max_pixels = size["shortest_edge"], size["longest_edge"]
    images = [img for p in prompts for img in _decode_images(p, min_pixels, max_pixels)]
    out = processor(
        text=[p.text for p in prompts],
        images=images or None,
        padding=True,
        padding_side=padding_side,
        return_tensors="pt",
        return_mm_token_type_ids=True,
    )
    return VLBatch(
        sample_ids=tuple(p.sample_id for p in prompts),
        input_ids_BS=out["input_ids"],
        attention_mask_BS=out["attention_mask"],
        mm_token_type_ids_BS=out["mm_token_type_ids"],
        pixel_values_PC=out.get("pixel_values") if images else None,
        image_grid_thw_N3=out.get("image_grid_thw") if images else None,
    )


def problem_prompt(
    processor: Qwen2_5_VLProcessor, problem: Problem, *, system_prompt: str
) -> VLPrompt:
    """The chat prompt (system turn, images, question, assistant header) of one problem."""
    messages = build_messages(problem, system_prompt=system_prompt)
    text = render_prompt(processor.tokenizer, messages)
    return VLPrompt(sample_id=problem.id, text=text, images=tuple(problem.images))


def encode_problems(
    processor: Qwen2_5_VLProcessor,
    problems: Sequence[Problem],
    *,
    system_prompt: str,
    padding_side: Literal["left", "right"] = "left",
) -> VLBatch:
    """Generation inputs of a batch of problems (left-padded by default, as for sampling)."""
    prompts = [problem_prompt(processor, p, system_prompt=system_prompt) for p in problems]
    return encode_prompts(processor, prompts, padding_side=padding_side)
