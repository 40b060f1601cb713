"""SFT conversations: a problem file whose rows carry a target response -> training ``Sample``s.

A conversation is the problem's prompt (system turn, images, question) and one assistant turn
holding the row's ``sft.response_field`` (``response`` by default; ``expert`` trains on the
expert solutions of a problem file). It is rendered with the chat template and processed like
any prompt (image placeholders expanded to their ``<|image_pad|>`` count), and the targets are
the assistant tokens only (``algorithms.sft.assistant_target_mask``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_metis.algorithms.sft import ChatTokenIds, assistant_target_mask
from megatron_metis.config import DataConfig, SFTConfig
from megatron_metis.data import Problem, build_messages, load_training_problems
from megatron_metis.data.vl_inputs import VLPrompt, encode_prompts
from megatron_metis.trainer.batching import Sample

logger = logging.getLogger(__name__)


def response_of(problem: Problem, field: str) -> str | None:
    """The target text of a row (``expert`` is a first-class field, others live in extra)."""
    value = problem.expert if field == "expert" else problem.extra.get(field)
    return value if isinstance(value, str) and value.strip() else None


@dataclass
class SFTDataset:
    """Conversations of an SFT run, encoded on demand."""

    problems: list[Problem]
    responses: list[str]
    processor: Any
    chat: ChatTokenIds
    system_prompt: str
    max_seq_len: int
    num_truncated: int = 0
    num_too_long: int = 0

    def __len__(self) -> int:
        return len(self.problems)

    def encode(self, i: int, *, index: int = 0) -> Sample | None:
        """The ``Sample`` of conversation ``i`` (None when its prompt alone is too long)."""
        problem = self.problems[i]
        messages = build_messages(problem, system_prompt=self.system_prompt)
        messages.append({"role": "assistant", "content": self.responses[i]})
        text = self.processor.tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = VLPrompt(sample_id=problem.id, text=text, images=tuple(problem.images))
        batch = encode_prompts(self.processor, [prompt])
        ids_L = batch.input_ids_BS[0]
        target_L = assistant_target_mask(ids_L, self.chat)
        if ids_L.numel() > self.max_seq_len:
            first_target = int(target_L.nonzero()[0]) if target_L.any() else ids_L.numel()
            if first_target >= self.max_seq_len - 1:
                self.num_too_long += 1
                return None
            self.num_truncated += 1
            ids_L, target_L = ids_L[: self.max_seq_len], target_L[: self.max_seq_len]
        return Sample(
            token_ids_L=ids_L,
            target_mask_L=target_L,
            pixel_values_PC=batch.pixel_values_PC,
            image_grid_thw_N3=batch.image_grid_thw_N3,
            index=index,
        )

    def samples(self, indices: Sequence[int]) -> list[Sample]:
        out = []
        for i in indices:
            sample = self.encode(i, index=len(out))
            if sample is not None:
                out.append(sample)
        return out


def load_sft_dataset(
    files: Sequence[str],
    data_cfg: DataConfig,
    sft_cfg: SFTConfig,
    *,
    processor: Any,
    chat: ChatTokenIds,
) -> SFTDataset:
    """Read and validate the files; rows without a target response are skipped (logged)."""
    loaded = load_training_problems(list(files), data_cfg, processor.tokenizer)
    problems, responses = [], []
    for problem in loaded:
        response = response_of(problem, sft_cfg.response_field)
        if response is None:
            continue
        problems.append(problem)
        responses.append(response)
    skipped = len(loaded) - len(problems)
    if skipped:
        logger.warning("%d rows have no %r field and are skipped", skipped, sft_cfg.response_field)
    if not problems:
        raise ValueError(
            f"no conversation with a {sft_cfg.response_field!r} field in {', '.join(files)}"
        )
    return SFTDataset(
        problems=problems,
        responses=responses,
        processor=processor,
        chat=chat,
        system_prompt=data_cfg.system_prompt,
        max_seq_len=sft_cfg.max_seq_len,
    )
