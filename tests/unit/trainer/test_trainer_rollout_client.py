"""The trainer samples through the one rollout client: RL requests are the stages' requests
(images included, which vLLM needs), and RL sampling parameters come from the config."""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch
from PIL import Image

from megatron_metis.config import load_config
from megatron_metis.data.schema import Problem
from megatron_metis.data.tokenizer import build_tiny_tokenizer
from megatron_metis.data.vl_inputs import build_vl_processor
from megatron_metis.rewards.scorer import ScoreBatch
from megatron_metis.rollout.client import RolloutClient, sampling_params
from megatron_metis.rollout.engine import Completion
from megatron_metis.trainer.rl_steps import generate_and_score
from megatron_metis.trainer.rollout_io import build_client


def _image_problem() -> Problem:
    buf = io.BytesIO()
    Image.new("RGB", (56, 84), "blue").save(buf, format="PNG")
    return Problem(id="img", question="What color?", answer="blue", images=(buf.getvalue(),))


def test_rl_requests_are_the_stage_requests_with_images():
    cfg = load_config(None, ["data.system_prompt=Solve."])
    tokenizer = build_tiny_tokenizer()
    processor = build_vl_processor(tokenizer, min_pixels=56 * 56, max_pixels=112 * 112)
    rt = SimpleNamespace(cfg=cfg, tokenizer=tokenizer, processor=processor)
    problem = _image_problem()
    rl = build_client(rt, None).request(problem)
    # what triage, `metis eval` and the local expert build for the same model and data section
    stage = RolloutClient(None, tokenizer, system_prompt="Solve.", processor=processor)
    ref = stage.request(problem)
    assert rl.images is not None and len(rl.images) == 1  # vLLM gets the image
    assert [im.tobytes() for im in rl.images] == [im.tobytes() for im in ref.images]
    assert rl.prompt_ids == ref.prompt_ids and rl.problem_id == ref.problem_id == "img"
    assert rl.mm_inputs.keys() == ref.mm_inputs.keys() == {"pixel_values", "image_grid_thw"}
    for key in rl.mm_inputs:
        assert torch.equal(rl.mm_inputs[key], ref.mm_inputs[key])


class _Engine:
    def __init__(self) -> None:
        self.params = []

    def generate(self, requests, params):
        self.params.append(params)
        return [
            Completion(i, s, [5, 6, 7], [0.0] * 3, "1", "stop", r.problem_id)
            for i, r in enumerate(requests)
            for s in range(params.n)
        ]


class _Scorer:
    def score(self, responses, golds, *, choices=None) -> ScoreBatch:
        ones = [1.0] * len(responses)
        return ScoreBatch(ones, ones, ones, {})


def test_rl_sampling_parameters_come_from_the_config():
    cfg = load_config(
        None,
        [
            "grpo.group_size=3",
            "rollout.temperature=0.6",
            "rollout.top_p=0.85",
            "rollout.max_new_tokens=21",
            "rollout.stop=[</answer>, STOP]",
        ],
    )
    engine = _Engine()
    client = RolloutClient(engine, build_tiny_tokenizer(), system_prompt="")
    problems = [Problem(id=f"p{i}", question="q", answer="1") for i in range(2)]
    groups, sums, _ = generate_and_score(
        # one process: the generator, no model-parallel peers to broadcast to
        SimpleNamespace(cfg=cfg, is_generator=True, ctx=SimpleNamespace(tp=1, pp=1, cp=1)),
        client,
        _Scorer(),
        problems,
        seed=1234,
    )
    [params] = engine.params
    assert params == sampling_params(cfg.rollout, n=3, seed=1234)
    got = (params.temperature, params.top_p, params.max_new_tokens, params.stop, params.n)
    assert got == (0.6, 0.85, 21, ("</answer>", "STOP"), 3) and params.seed == 1234
    assert [len(g.completions) for g in groups] == [3, 3] and sums["responses"] == 6.0
