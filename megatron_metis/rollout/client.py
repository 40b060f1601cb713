"""One client for sample-and-score work: problem -> request -> completions -> scores.

RL rollouts and the in-loop evaluation (``trainer``), triage, ``metis eval`` and the local-model
expert (``stages``) all go through ``RolloutClient``, so a problem reaches every engine in the
same form and every caller samples with parameters built by the one ``sampling_params``.

Requests: a prompt is the chat template with the system prompt (``DataConfig.system_prompt``).
Image prompts go through the Qwen2.5-VL processor, which expands each image's placeholder to
its ``<|image_pad|>`` count and computes the pixel patches; a request carries both the decoded
images (what vLLM takes) and the processed ``mm_inputs`` (what ``HFRolloutEngine`` and the
trainer take). Distributed concerns (which rank generates, broadcasting the results) stay in
the trainer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from megatron_metis.config.data import DataConfig
from megatron_metis.config.rl import RolloutConfig
from megatron_metis.config.stages import EvalConfig, ExpertConfig, TriageConfig
from megatron_metis.data.io import ProgressLog
from megatron_metis.data.messages import build_messages, render_prompt
from megatron_metis.data.schema import Problem
from megatron_metis.rewards.scorer import ScoreBatch
from megatron_metis.rollout.engine import Completion, RolloutEngine, RolloutRequest, SamplingParams

logger = logging.getLogger(__name__)

END_OF_TURN = ("<|im_end|>", "<|endoftext|>")
"""End-of-sequence texts the HF engine keeps at the end of a completion that ended on EOS."""


def strip_end_of_turn(text: str) -> str:
    """``text`` without one trailing end-of-turn special token (the SFT template adds it)."""
    for token in END_OF_TURN:
        if text.endswith(token):
            return text[: -len(token)]
    return text


def sampling_params(
    rollout: RolloutConfig,
    section: EvalConfig | TriageConfig | ExpertConfig | None = None,
    *,
    n: int = 1,
    seed: int | None = None,
) -> SamplingParams:
    """The sampling parameters of every caller, from its config section.

    Stop strings always come from ``rollout``; a section's ``max_new_tokens`` of 0 means
    ``rollout.max_new_tokens``.

    Args:
        rollout: the rollout section.
        section: whose sampling it is. None: RL rollouts (``rollout``'s temperature, top-p and
            token limit); ``EvalConfig``: ``mode=greedy`` is one temperature-0 response,
            ``sampled`` its ``num_samples`` at its temperature and top-p, with its seed;
            ``TriageConfig``: its temperature, top-p, ``num_samples`` and seed;
            ``ExpertConfig`` (the local expert): its temperature, ``max_tokens`` and
            ``num_samples``, top-p 1.
        n: responses per request when ``section`` is None (the GRPO group size).
        seed: the seed when ``section`` has none (RL rounds, the local expert).
    """
    temperature, top_p, max_new_tokens = rollout.temperature, rollout.top_p, 0
    match section:
        case EvalConfig(mode="greedy"):
            temperature, top_p, max_new_tokens = 0.0, 1.0, section.max_new_tokens
            n, seed = 1, section.seed
        case EvalConfig() | TriageConfig():
            temperature, top_p = section.temperature, section.top_p
            max_new_tokens, n, seed = section.max_new_tokens, section.num_samples, section.seed
        case ExpertConfig():
            temperature, top_p, max_new_tokens = section.temperature, 1.0, section.max_tokens
            n = section.num_samples
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens or rollout.max_new_tokens,
        stop=tuple(rollout.stop),
        n=n,
        seed=seed,
    )


class Scorer(Protocol):
    """What the client needs of ``rewards.RewardScorer``."""

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


class RolloutClient:
    """Turns problems into requests, samples them with one engine and scores the responses.

    The one place where a problem becomes what an engine is given: a request carries the
    prompt with its image placeholders expanded (the trainer, transformers) and with one
    placeholder per image (vLLM, which expands them with the same pixel limits).

    Args:
        engine: the rollout engine; None where this rank only builds requests (a trainer rank
            that does not generate).
        tokenizer: the model's tokenizer (chat template).
        system_prompt: the system turn of every prompt.
        processor: the Qwen2.5-VL processor; None for a text-only model (image problems fail).
        cache_requests: keep each problem's request (by problem id): for callers that see the
            same problems again (RL steps, periodic evaluation), not for one pass over a pool.
    """

    def __init__(
        self,
        engine: RolloutEngine | None,
        tokenizer: PreTrainedTokenizerBase,
        *,
        system_prompt: str,
        processor: Any | None = None,
        cache_requests: bool = False,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.processor = processor
        self._cache: dict[str, RolloutRequest] | None = {} if cache_requests else None

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the engine (``with load_client(...) as client:`` does it)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def request(self, problem: Problem) -> RolloutRequest:
        """The request of ``problem`` (``problem_id`` set; images with ``mm_inputs``).

        Raises:
            ValueError: the problem has images but the client has no processor.
        """
        if self._cache is not None and problem.id in self._cache:
            return self._cache[problem.id]
        req = self._build_request(problem)
        if self._cache is not None:
            self._cache[problem.id] = req
        return req

    def _build_request(self, problem: Problem) -> RolloutRequest:
        if not problem.images:
            messages = build_messages(problem, system_prompt=self.system_prompt)
            ids = self.tokenizer(render_prompt(self.tokenizer, messages), add_special_tokens=False)
            return RolloutRequest(prompt_ids=list(ids["input_ids"]), problem_id=problem.id)
        if self.processor is None:
            raise ValueError(
                f"problem {problem.id!r} has images but the model has no image processor "
                "(a text-only checkpoint?)"
            )
        from megatron_metis.data.vl_inputs import encode_problems

        batch = encode_problems(self.processor, [problem], system_prompt=self.system_prompt)
        messages = build_messages(problem, system_prompt=self.system_prompt)
        placeholders = self.tokenizer(
            render_prompt(self.tokenizer, messages), add_special_tokens=False
        )["input_ids"]
        mm = None
        if batch.pixel_values_PC is not None:
            mm = {"pixel_values": batch.pixel_values_PC, "image_grid_thw": batch.image_grid_thw_N3}
        return RolloutRequest(
            prompt_ids=batch.input_ids_BS[0].tolist(),
            placeholder_prompt_ids=list(placeholders),
            images=problem.load_images(),
            mm_inputs=mm,
            problem_id=problem.id,
        )

    def generate(self, problems: Sequence[Problem], params: SamplingParams) -> list[Completion]:
        """``params.n`` completions per problem, problem-major (``request_index`` = position)."""
        if self.engine is None:
            raise RuntimeError("this RolloutClient has no engine (not a generating rank)")
        return self.engine.generate([self.request(p) for p in problems], params)

    def score(
        self,
        problems: Sequence[Problem],
        completions: Sequence[Completion],
        scorer: Scorer,
        *,
        raw_text: bool = False,
    ) -> ScoreBatch:
        """The verifier's scores of ``completions`` (each against its problem's answer).

        Args:
            raw_text: score the text exactly as decoded; by default without a trailing
                end-of-turn token (what ``ScoredSample.text`` keeps).
        """
        texts = [c.text if raw_text else strip_end_of_turn(c.text) for c in completions]
        owners = [problems[c.request_index] for c in completions]
        return scorer.score(texts, [p.answer for p in owners], choices=[p.choices for p in owners])

    def sample_and_score(
        self, problems: Sequence[Problem], params: SamplingParams, scorer: Scorer
    ) -> list[list[ScoredSample]]:
        """``params.n`` scored responses per problem, in problem order."""
        if not problems:
            return []
        completions = self.generate(problems, params)
        batch = self.score(problems, completions, scorer)
        grouped: list[list[ScoredSample]] = [[] for _ in problems]
        for c, acc, fmt in zip(completions, batch.accuracy, batch.format, strict=True):
            grouped[c.request_index].append(
                ScoredSample(
                    text=strip_end_of_turn(c.text),
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

    def score_problems(
        self,
        problems: Sequence[Problem],
        params: SamplingParams,
        scorer: Scorer,
        *,
        progress: ProgressLog,
        prompts_per_batch: int,
    ) -> list[list[ScoredSample]]:
        """Samples of every problem, in problem order; resumable.

        Problems already in ``progress`` are reused; the others are sampled and scored batch by
        batch, each batch appended to ``progress`` (rows ``{id, category, samples}``) before
        the next starts. A batch is sampled with seed ``params.seed`` plus the position of its
        first problem in ``problems``, so results do not depend on where a run was resumed.
        """
        done = progress.load()
        todo = [(i, p) for i, p in enumerate(problems) if p.id not in done]
        if len(todo) < len(problems):
            already = len(problems) - len(todo)
            logger.info("%s: %d of %d prompts done already", progress.path, already, len(problems))
        for start in range(0, len(todo), prompts_per_batch):
            chunk = todo[start : start + prompts_per_batch]
            batch_params = dataclasses.replace(params, seed=(params.seed or 0) + chunk[0][0])
            groups = self.sample_and_score([p for _, p in chunk], batch_params, scorer)
            rows = [
                {"id": p.id, "category": p.category, "samples": [s.to_json() for s in group]}
                for (_, p), group in zip(chunk, groups, strict=True)
            ]
            progress.append(rows)
            done.update({row["id"]: row for row in rows})
            finished = len(problems) - len(todo) + start + len(chunk)
            logger.info("%s: %d / %d prompts", progress.path, finished, len(problems))
        return [[ScoredSample.from_json(s) for s in done[p.id]["samples"]] for p in problems]


def load_client(
    hf_dir: str | Path, rollout: RolloutConfig, data: DataConfig, *, device: str = "cpu"
) -> RolloutClient:
    """A client over the rollout engine of the HF folder ``hf_dir`` (its tokenizer, and a VL
    processor for Qwen2.5-VL), with ``data``'s system prompt and image pixel limits."""
    from transformers import AutoConfig, AutoTokenizer

    from megatron_metis.rollout.factory import build_rollout_engine

    pixels = (data.image_min_pixels, data.image_max_pixels)
    engine = build_rollout_engine(rollout, hf_dir, device=device, image_pixels=pixels)
    tokenizer = getattr(engine, "tokenizer", None) or AutoTokenizer.from_pretrained(hf_dir)
    processor = None
    if AutoConfig.from_pretrained(hf_dir).model_type == "qwen2_5_vl":
        from megatron_metis.data.vl_inputs import build_vl_processor

        processor = build_vl_processor(
            tokenizer, min_pixels=data.image_min_pixels, max_pixels=data.image_max_pixels
        )
        if hasattr(engine, "processor") and engine.processor is None:
            engine.processor = processor
    return RolloutClient(engine, tokenizer, system_prompt=data.system_prompt, processor=processor)
