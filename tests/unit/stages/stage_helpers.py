"""Stub rollout engine and small builders shared by the stage tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from megatron_metis.data.schema import Problem
from megatron_metis.rollout.engine import Completion, RolloutRequest, SamplingParams


def solved(answer: str, pad: str = "") -> str:
    """A well-formed response with answer ``answer`` (``pad`` lengthens the reasoning)."""
    return f"<think> reasoning {pad}</think><answer> The answer is $\\boxed{{{answer}}}$ </answer>"


TRUNCATED = "<cut at max_new_tokens>"


class StubEngine:
    """A ``RolloutEngine`` whose responses are scripted per problem id and sample index.

    ``script[id]`` is a list of texts (sample i gets item ``i % len``) or a function of
    (sample index, params); a text ending in ``TRUNCATED`` comes back cut at the token
    limit (``finish_reason="length"``, no end-of-turn token). ``fail_on_call`` raises on that
    generate call (0-based) to simulate a killed stage.
    """

    def __init__(
        self,
        script: dict[str, list[str] | Callable[[int, SamplingParams], str]],
        *,
        fail_on_call: int | None = None,
        eos: str = "<|im_end|>",
    ) -> None:
        self.script = script
        self.fail_on_call = fail_on_call
        self.eos = eos
        self.calls: list[tuple[list[str], SamplingParams]] = []

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams):
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            self.calls.append(([], params))
            raise KeyboardInterrupt("killed")
        self.calls.append(([r.problem_id for r in requests], params))
        out = []
        for i, req in enumerate(requests):
            for s in range(params.n):
                item = self.script[req.problem_id]
                text = item(s, params) if callable(item) else item[s % len(item)]
                cut = text.endswith(TRUNCATED)
                text = text.removesuffix(TRUNCATED)
                out.append(
                    Completion(
                        request_index=i,
                        sample_index=s,
                        token_ids=list(range(len(text.split()) + 1)),
                        logprobs=[0.0] * (len(text.split()) + 1),
                        text=text if cut else text + self.eos,
                        finish_reason="length" if cut else "stop",
                        problem_id=req.problem_id,
                    )
                )
        return out

    @property
    def requested_ids(self) -> list[str]:
        return [pid for ids, _ in self.calls for pid in ids]


def problem(pid: str, answer: str, **kw) -> Problem:
    kw.setdefault("question", f"Question {pid}?")
    return Problem(id=pid, answer=answer, **kw)
