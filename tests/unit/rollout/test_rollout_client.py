"""The one sample-and-score client: requests, sampling parameters from config, resumable
batches, and the log-prob temperature rule."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pytest
from PIL import Image

from megatron_metis.config.rl import RolloutConfig
from megatron_metis.config.stages import EvalConfig, ExpertConfig, TriageConfig
from megatron_metis.data.io import ProgressLog
from megatron_metis.data.schema import Problem
from megatron_metis.data.vl_inputs import build_vl_processor
from megatron_metis.rewards.scorer import ScoreBatch
from megatron_metis.rollout import logprob_temperature
from megatron_metis.rollout.client import RolloutClient, sampling_params
from megatron_metis.rollout.engine import Completion, RolloutRequest, SamplingParams

ROLLOUT = RolloutConfig(temperature=0.7, top_p=0.9, max_new_tokens=77, stop=("</answer>", "##"))


def image_problem(pid: str = "i") -> Problem:
    buf = io.BytesIO()
    Image.new("RGB", (56, 84), "blue").save(buf, format="PNG")
    return Problem(id=pid, question="Color?", answer="blue", images=(buf.getvalue(),))


def test_request_text_and_image(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    text = Problem(id="t", question="Compute 3 + 4.", answer="7")
    req = RolloutClient(None, tokenizer, system_prompt="SYS").request(text)
    decoded = tokenizer.decode(req.prompt_ids)
    assert "SYS" in decoded and "Compute 3 + 4." in decoded and req.problem_id == "t"
    assert decoded.endswith("<|im_start|>assistant\n")
    assert req.images is None and req.mm_inputs is None
    image = image_problem()
    with pytest.raises(ValueError, match="image processor"):
        RolloutClient(None, tokenizer, system_prompt="").request(image)
    proc = build_vl_processor(tokenizer, min_pixels=56 * 56, max_pixels=112 * 112)
    req = RolloutClient(None, tokenizer, system_prompt="", processor=proc).request(image)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = req.mm_inputs["image_grid_thw"]
    assert req.prompt_ids.count(pad) == int(grid.prod()) // 4
    assert req.mm_inputs["pixel_values"].shape[0] == int(grid.prod())
    assert len(req.images) == 1


def test_requests_are_cached_only_when_asked(tiny_tokenizer):
    proc = build_vl_processor(tiny_tokenizer, min_pixels=56 * 56, max_pixels=112 * 112)
    cached = RolloutClient(
        None, tiny_tokenizer, system_prompt="", processor=proc, cache_requests=True
    )
    once = RolloutClient(None, tiny_tokenizer, system_prompt="", processor=proc)
    p = image_problem()
    assert cached.request(p) is cached.request(p)
    assert once.request(p) is not once.request(p)


@pytest.mark.parametrize(
    "section,kw,expected",
    [
        # RL rollouts: the rollout section, the group size and the round's seed
        (None, {"n": 8, "seed": 11}, (0.7, 0.9, 77, 8, 11)),
        (EvalConfig(max_new_tokens=33, seed=4, temperature=0.5), {}, (0.0, 1.0, 33, 1, 4)),
        (EvalConfig(seed=4), {}, (0.0, 1.0, 77, 1, 4)),
        (
            EvalConfig(mode="sampled", num_samples=6, temperature=0.6, top_p=0.8, seed=5),
            {},
            (0.6, 0.8, 77, 6, 5),
        ),
        (
            TriageConfig(num_samples=3, temperature=1.2, top_p=0.95, max_new_tokens=55, seed=9),
            {},
            (1.2, 0.95, 55, 3, 9),
        ),
        (
            ExpertConfig(temperature=0.3, max_tokens=99, num_samples=2),
            {"seed": 7},
            (0.3, 1.0, 99, 2, 7),
        ),
    ],
    ids=["rl", "eval-greedy", "eval-greedy-default-tokens", "eval-sampled", "triage", "expert"],
)
def test_sampling_params_carry_the_config(section, kw, expected):
    params = sampling_params(ROLLOUT, section, **kw)
    got = (params.temperature, params.top_p, params.max_new_tokens, params.n, params.seed)
    assert got == expected
    assert params.stop == ("</answer>", "##")  # always the rollout section's


def test_logprob_temperature_greedy_means_one():
    assert logprob_temperature(0.0) == 1.0
    assert logprob_temperature(0.7) == 0.7


class RecordingEngine:
    """Answers every request with its problem id; records the parameters of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], SamplingParams]] = []

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams):
        self.calls.append(([r.problem_id for r in requests], params))
        return [
            Completion(i, s, [1, 2], [0.0, 0.0], f"{r.problem_id}<|im_end|>", "stop", r.problem_id)
            for i, r in enumerate(requests)
            for s in range(params.n)
        ]


class EchoScorer:
    """Correct when the response is the gold answer; records the texts it was given."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def score(self, responses, golds, *, choices=None) -> ScoreBatch:
        self.texts += list(responses)
        acc = [float(r == g) for r, g in zip(responses, golds, strict=True)]
        return ScoreBatch(acc, acc, [0.0] * len(acc), {})


def test_score_problems_batches_seeds_by_position_and_resumes(tmp_path, tiny_tokenizer):
    problems = [Problem(id=f"p{i}", question=f"q{i}", answer=f"p{i}") for i in range(5)]
    engine = RecordingEngine()
    client = RolloutClient(engine, tiny_tokenizer, system_prompt="")
    params = SamplingParams(n=2, seed=100)
    progress = ProgressLog(tmp_path / "samples.jsonl")
    first = client.score_problems(
        problems[:3], params, EchoScorer(), progress=progress, prompts_per_batch=2
    )
    assert [ids for ids, _ in engine.calls] == [["p0", "p1"], ["p2"]]
    assert [p.seed for _, p in engine.calls] == [100, 102]
    assert all(s.correct and s.text == f"p{i}" for i, g in enumerate(first) for s in g)
    engine.calls.clear()
    scorer = EchoScorer()
    out = client.score_problems(problems, params, scorer, progress=progress, prompts_per_batch=2)
    # only the missing problems, seeded by their position in the whole list
    assert [ids for ids, _ in engine.calls] == [["p3", "p4"]]
    assert [p.seed for _, p in engine.calls] == [103]
    assert scorer.texts == ["p3", "p3", "p4", "p4"]  # scored without the end-of-turn token
    assert [[s.sample_index for s in g] for g in out] == [[0, 1]] * 5
    assert out[:3] == first


def test_raw_text_scoring_keeps_the_end_of_turn_token(tiny_tokenizer):
    problems = [Problem(id="a", question="q", answer="a")]
    client = RolloutClient(RecordingEngine(), tiny_tokenizer, system_prompt="")
    completions = client.generate(problems, SamplingParams(n=1))
    scorer = EchoScorer()
    assert client.score(problems, completions, scorer, raw_text=True).accuracy == [0.0]
    assert client.score(problems, completions, scorer).accuracy == [1.0]
    assert scorer.texts == ["a<|im_end|>", "a"]


def test_a_client_without_engine_only_builds_requests(tiny_tokenizer):
    client = RolloutClient(None, tiny_tokenizer, system_prompt="")
    with pytest.raises(RuntimeError, match="no engine"):
        client.generate([Problem(id="a", question="q", answer="1")], SamplingParams())
