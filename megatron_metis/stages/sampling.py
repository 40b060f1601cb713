"""Sample responses for problems and score them with the verifier (shared by triage and eval),
and write problems back as dataset rows (the stages' output files are datasets too)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from megatron_metis.data.schema import Problem
from megatron_metis.rewards.scorer import ScoreBatch
from megatron_metis.rollout.engine import SamplingParams
from megatron_metis.stages.requests import GenerationModel, build_requests
from megatron_metis.stages.runner import atomic_write_bytes

END_OF_TURN = ("<|im_end|>", "<|endoftext|>")
"""End-of-sequence texts the HF engine keeps at the end of a completion that ended on EOS."""


class Scorer(Protocol):
    """What the stages need of ``rewards.RewardScorer``."""

    def score(
        self,
        responses: Sequence[str],
        golds: Sequence[str],
        *,
        choices: Sequence[Sequence[str] | None] | None = None,
    ) -> ScoreBatch: ...


@dataclass(frozen=True)
class ScoredSample:
    """One sampled response and its verdict.

    Attributes:
        text: the response exactly as generated, minus a trailing end-of-turn token.
        correct: the verifier accepted its answer (accuracy reward 1).
        format: the format reward (1: ``<think>..</think><answer>..\\boxed{}..</answer>``).
        num_tokens: generated tokens.
        finish_reason: ``stop`` or ``length`` (truncated).
        sample_index: 0..n-1 within its prompt.
    """

    text: str
    correct: bool
    format: float
    num_tokens: int
    finish_reason: str
    sample_index: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> ScoredSample:
        return cls(**row)


def strip_end_of_turn(text: str) -> str:
    """``text`` without one trailing end-of-turn special token (the SFT template adds it)."""
    for token in END_OF_TURN:
        if text.endswith(token):
            return text[: -len(token)]
    return text


def sample_and_score(
    model: GenerationModel,
    problems: Sequence[Problem],
    params: SamplingParams,
    scorer: Scorer,
    *,
    system_prompt: str,
) -> list[list[ScoredSample]]:
    """``params.n`` scored responses per problem, in problem order."""
    if not problems:
        return []
    requests = build_requests(
        problems, model.tokenizer, system_prompt=system_prompt, processor=model.processor
    )
    completions = model.engine.generate(requests, params)
    texts = [strip_end_of_turn(c.text) for c in completions]
    owners = [problems[c.request_index] for c in completions]
    batch = scorer.score(texts, [p.answer for p in owners], choices=[p.choices for p in owners])
    grouped: list[list[ScoredSample]] = [[] for _ in problems]
    for c, text, acc, fmt in zip(completions, texts, batch.accuracy, batch.format, strict=True):
        grouped[c.request_index].append(
            ScoredSample(
                text=text,
                correct=acc >= 1.0,
                format=float(fmt),
                num_tokens=len(c.token_ids),
                finish_reason=c.finish_reason,
                sample_index=c.sample_index,
            )
        )
    for group in grouped:
        group.sort(key=lambda s: s.sample_index)
    return grouped


def problem_to_row(problem: Problem, *, out_file: str | Path) -> dict[str, Any]:
    """The dataset row of ``problem`` for a JSONL file at ``out_file``.

    Image paths are written relative to ``out_file``'s folder; embedded images (bytes) are
    saved as ``images/<id>_<k>.png`` beside it.
    """
    base = Path(out_file).resolve().parent
    images = []
    for k, src in enumerate(problem.images):
        if isinstance(src, bytes):
            path = base / "images" / f"{_safe(problem.id)}_{k}.png"
            if not path.exists():
                atomic_write_bytes(path, src)
            src = str(path)
        images.append(os.path.relpath(Path(src).resolve(), base))
    row: dict[str, Any] = {"id": problem.id, "question": problem.question, "answer": problem.answer}
    if images:
        row["images"] = images
    if problem.choices:
        row["choices"] = list(problem.choices)
    row["source"] = problem.source
    row["category"] = problem.category
    if problem.difficulty is not None:
        row["difficulty"] = problem.difficulty
    if problem.expert is not None:
        row["expert"] = problem.expert
    row.update({k: v for k, v in problem.extra.items() if k not in row})
    return row


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
