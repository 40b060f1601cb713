"""Problems -> chat messages (transformers' multimodal chat style) -> prompt text and length."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image
from transformers import PreTrainedTokenizerBase

from megatron_metis.data.schema import Problem

Message = dict[str, Any]
"""``{"role": ..., "content": str | list of {"type": "image"|"text", ...}}``."""

PATCH_SIZE = 14
MERGE_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE


def question_text(problem: Problem) -> str:
    """The user text: the question, then the choices as ``A. ...`` lines when it has any."""
    if not problem.choices:
        return problem.question
    lines = [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(problem.choices)]
    return problem.question + "\nOptions:\n" + "\n".join(lines)


def build_messages(
    problem: Problem, *, system_prompt: str, images: list[Image.Image] | None = None
) -> list[Message]:
    """System turn (when ``system_prompt`` is not empty) and a user turn: images, then text.

    Args:
        problem: the problem.
        system_prompt: the system turn (``DataConfig.system_prompt``).
        images: decoded images to put in the content parts; by default the problem's sources.
    """
    messages: list[Message] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if not problem.images:
        messages.append({"role": "user", "content": question_text(problem)})
        return messages
    sources = images if images is not None else list(problem.images)
    parts: list[dict[str, Any]] = [{"type": "image", "image": src} for src in sources]
    parts.append({"type": "text", "text": question_text(problem)})
    messages.append({"role": "user", "content": parts})
    return messages


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    """The prompt text with the chat template and the assistant generation header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def smart_resize(
    height: int, width: int, *, min_pixels: int, max_pixels: int, factor: int = IMAGE_FACTOR
) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule: sides multiples of ``factor``, area within [min, max] pixels."""
    if max(height, width) / max(1, min(height, width)) > 200:
        raise ValueError(f"image aspect ratio over 200: {width}x{height}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_token_count(width: int, height: int, *, min_pixels: int, max_pixels: int) -> int:
    """``<|image_pad|>`` tokens of one image after smart resize and the 2x2 patch merge."""
    h_bar, w_bar = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h_bar // PATCH_SIZE) * (w_bar // PATCH_SIZE) // (MERGE_SIZE * MERGE_SIZE)


def count_prompt_tokens(
    tokenizer: PreTrainedTokenizerBase,
    problem: Problem,
    *,
    system_prompt: str,
    image_sizes: list[tuple[int, int]],
    min_pixels: int,
    max_pixels: int,
) -> int:
    """Prompt length in tokens, image placeholders expanded to their ``<|image_pad|>`` count.

    Args:
        image_sizes: (width, height) of each image of ``problem``.
    """
    text = render_prompt(tokenizer, build_messages(problem, system_prompt=system_prompt))
    n_text = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    n_image = sum(
        image_token_count(w, h, min_pixels=min_pixels, max_pixels=max_pixels) - 1
        for w, h in image_sizes
    )
    return n_text + n_image
