"""Problems -> rollout requests, and the generation model of a stage (an HF folder).

Triage, evaluation and the local expert all generate from an HF checkpoint folder through the
rollout engine; no Megatron model is needed. A prompt is the chat template with the system
prompt (``DataConfig.system_prompt``); image prompts go through the Qwen2.5-VL processor, which
expands each image's placeholder to its ``<|image_pad|>`` count and computes the pixel patches
(``mm_inputs`` for the HF engine; the decoded images for vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from megatron_metis.config.data import DataConfig
from megatron_metis.config.rl import RolloutConfig
from megatron_metis.data.messages import build_messages, render_prompt
from megatron_metis.data.schema import Problem
from megatron_metis.rollout.engine import RolloutEngine, RolloutRequest


@dataclass
class GenerationModel:
    """What a stage needs to generate: the engine, its tokenizer and (VL models) processor."""

    engine: RolloutEngine
    tokenizer: PreTrainedTokenizerBase
    processor: Any | None = None


def build_requests(
    problems: Sequence[Problem],
    tokenizer: PreTrainedTokenizerBase,
    *,
    system_prompt: str,
    processor: Any | None = None,
) -> list[RolloutRequest]:
    """One request per problem, in order (``problem_id`` set).

    Raises:
        ValueError: a problem has images but no processor was given (a text-only model).
    """
    return [
        _request(p, tokenizer, system_prompt=system_prompt, processor=processor) for p in problems
    ]


def _request(
    problem: Problem,
    tokenizer: PreTrainedTokenizerBase,
    *,
    system_prompt: str,
    processor: Any | None,
) -> RolloutRequest:
    if not problem.images:
        text = render_prompt(tokenizer, build_messages(problem, system_prompt=system_prompt))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return RolloutRequest(prompt_ids=list(ids), problem_id=problem.id)
    if processor is None:
        raise ValueError(
            f"problem {problem.id!r} has images but the model has no image processor "
            "(a text-only checkpoint?)"
        )
    from megatron_metis.data.vl_inputs import encode_problems

    batch = encode_problems(processor, [problem], system_prompt=system_prompt)
    mm: dict[str, Any] = {}
    if batch.pixel_values_PC is not None:
        mm = {"pixel_values": batch.pixel_values_PC, "image_grid_thw": batch.image_grid_thw_N3}
    return RolloutRequest(
        prompt_ids=batch.input_ids_BS[0].tolist(),
        images=problem.load_images(),
        mm_inputs=mm or None,
        problem_id=problem.id,
    )


def load_generation_model(
    hf_dir: str | Path,
    rollout: RolloutConfig,
    data: DataConfig,
    *,
    device: str = "cpu",
) -> GenerationModel:
    """The rollout engine of ``hf_dir`` with its tokenizer (and a VL processor for Qwen2.5-VL)."""
    from transformers import AutoConfig, AutoTokenizer

    from megatron_metis.rollout.factory import build_rollout_engine

    engine = build_rollout_engine(rollout, hf_dir, device=device)
    tokenizer = getattr(engine, "tokenizer", None) or AutoTokenizer.from_pretrained(hf_dir)
    processor = None
    if AutoConfig.from_pretrained(hf_dir).model_type == "qwen2_5_vl":
        from megatron_metis.data.vl_inputs import build_vl_processor

        processor = build_vl_processor(
            tokenizer, min_pixels=data.image_min_pixels, max_pixels=data.image_max_pixels
        )
        if hasattr(engine, "processor") and engine.processor is None:
            engine.processor = processor
    return GenerationModel(engine=engine, tokenizer=tokenizer, processor=processor)
