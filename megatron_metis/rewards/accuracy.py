"""The 0/1 accuracy reward: extract the answer, try the exact fast paths, then math-verify."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from megatron_metis.rewards.extract import Candidate, extract_candidate
from megatron_metis.rewards.fastpath import GoldPlan, decide, plan_gold
from megatron_metis.rewards.verifier import GoldCache, Verdict, verify_answer

DEFAULT_MAX_ANSWER_CHARS = 1000
DEFAULT_MAX_ANSWER_DEPTH = 16
DEFAULT_TIMEOUT_S = 3.0


class Route(enum.Enum):
    """How an accuracy decision was reached (each is a metrics counter of the scorer)."""

    FAST_PATH = "fast_path"
    NO_ANSWER = "no_answer"
    TOO_COMPLEX = "too_complex"
    GOLD_UNPARSEABLE = "gold_unparseable"
    VERIFIER = "verifier"


@dataclass(frozen=True)
class Prejudged:
    """Result of the cheap checks: a final ``verdict``, or a ``candidate`` for math-verify."""

    route: Route
    verdict: Verdict | None = None
    candidate: Candidate | None = None


@lru_cache(maxsize=8192)
def cached_plan(gold: str) -> GoldPlan:
    """``plan_gold`` memoised: the same gold is scored G times per prompt."""
    return plan_gold(gold)


def prejudge(
    response: str,
    gold: str,
    *,
    choices: Sequence[str] | None = None,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    max_answer_depth: int = DEFAULT_MAX_ANSWER_DEPTH,
) -> Prejudged:
    """Everything short of math-verify: answer extraction, size guards, exact fast paths."""
    plan = cached_plan(gold)
    if plan.kind == "empty":
        return Prejudged(route=Route.GOLD_UNPARSEABLE, verdict=Verdict.GOLD_UNPARSEABLE)
    candidate = extract_candidate(response)
    if candidate is None:
        return Prejudged(route=Route.NO_ANSWER, verdict=Verdict.WRONG)
    too_deep = _nesting_depth(candidate.text) > max_answer_depth
    if len(candidate.text) > max_answer_chars or too_deep:
        return Prejudged(route=Route.TOO_COMPLEX, verdict=Verdict.WRONG)
    decided = decide(plan, candidate.text, choices)
    if decided is not None:
        verdict = Verdict.CORRECT if decided else Verdict.WRONG
        return Prejudged(route=Route.FAST_PATH, verdict=verdict)
    return Prejudged(route=Route.VERIFIER, candidate=candidate)


def _nesting_depth(text: str) -> int:
    """Deepest nesting of brackets of any kind (``[1,3)`` counts as depth 1)."""
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth = max(0, depth - 1)
    return deepest


def accuracy_reward(
    response: str,
    answer: str,
    *,
    choices: Sequence[str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    max_answer_depth: int = DEFAULT_MAX_ANSWER_DEPTH,
) -> float:
    """1.0 when the response's answer matches the gold ``answer``, else 0.0.

    The answer is the ``<answer>...</answer>`` span (its last ``\\boxed{}`` when it has one),
    else the response's last ``\\boxed{}``. Exact fast paths decide plain numbers, choice
    letters and text answers; everything else goes to math-verify. An unparseable gold scores
    0. Runs math-verify in this process: call it from the main thread (use ``RewardScorer``
    for batches, threads or untrusted input).

    Args:
        response: the model's full response.
        answer: the gold answer.
        choices: texts of the choices A, B, ... of a multiple-choice problem, if any.
        timeout_s: math-verify budget (whole seconds, rounded up).
        max_answer_chars: longer extracted answers score 0 unparsed.
        max_answer_depth: answers with deeper bracket nesting score 0 unparsed.
    """
    pre = prejudge(
        response,
        answer,
        choices=choices,
        max_answer_chars=max_answer_chars,
        max_answer_depth=max_answer_depth,
    )
    if pre.verdict is not None:
        return 1.0 if pre.verdict is Verdict.CORRECT else 0.0
    assert pre.candidate is not None
    verdict = verify_answer(
        pre.candidate.verifier_input, answer, timeout_s=timeout_s, cache=GoldCache(1)
    )
    return 1.0 if verdict is Verdict.CORRECT else 0.0
