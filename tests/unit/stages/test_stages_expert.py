"""Expert augmentation: format normalisation, file / solver / local sources, rejection."""

from __future__ import annotations

import json

import pytest
from stage_helpers import StubEngine, problem, solved

from megatron_metis.config.data import DataConfig
from megatron_metis.config.stages import ExpertConfig
from megatron_metis.data.check import load_problems
from megatron_metis.data.io import read_jsonl
from megatron_metis.data.synth import write_synthetic_dataset
from megatron_metis.rewards.accuracy import accuracy_reward
from megatron_metis.rewards.extract import format_reward
from megatron_metis.rollout.engine import SamplingParams
from megatron_metis.stages.expert import (
    FileExpert,
    LocalModelExpert,
    SolverExpert,
    build_expert_source,
    normalize_trajectory,
    run_expert,
)


@pytest.mark.parametrize(
    "raw,expected_answer",
    [
        ("First add 3 and 4.\nThe answer is 7.", "7"),
        ("Adding gives seven.\nFinal answer: $7$", "7"),
        ("We compute 3+4 = \\boxed{7}", "7"),
        ("<think>3+4=7</think><answer>7</answer>", "7"),
        ("<think>3+4</think> so <answer>The answer is 7</answer>", "7"),
        ("Reasoning here. <answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
    ],
)
def test_normalize_puts_answers_in_the_think_answer_format(raw, expected_answer):
    text, reason = normalize_trajectory(raw)
    assert reason == "ok"
    assert format_reward(text) == 1.0
    assert f"\\boxed{{{expected_answer}}}" in text


def test_normalize_keeps_well_formed_text_and_rejects_the_rest():
    good = solved("7")
    assert normalize_trajectory(good + "<|im_end|>") == (good, "ok")
    assert normalize_trajectory("I do not know.") == (None, "no_answer")
    assert normalize_trajectory("\\boxed{7}") == (None, "no_reasoning")


def _problems():
    return [
        problem("a", "7", category="arith"),
        problem("b", "12", category="arith"),
        problem("c", "B", choices=("x", "y"), category="compare"),
        problem("d", "3", category="algebra"),
    ]


def test_file_source_normalises_verifies_and_rejects(tmp_path, scorer):
    expert_file = tmp_path / "experts.jsonl"
    rows = [
        {"id": "a", "response": "Since 3 + 4 = 7.\nThe answer is 7."},  # reformatted, ok
        {"id": "b", "responses": ["It is 13.\nAnswer: 13", solved("12")]},  # wrong, then ok
        {"id": "c", "response": "no idea"},  # no answer
        {"id": "zzz", "response": solved("1")},  # not asked for
    ]
    expert_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "expert"
    report = run_expert(
        _problems(), FileExpert(expert_file), scorer, keep_per_prompt=1, out_dir=out
    )
    assert report["prompts_solved"] == 2 and report["accepted"] == 2
    assert report["candidates"] == 4 and report["normalized"] == 2
    assert report["rejected"] == {
        "no_candidate": 1,
        "request_error": 0,
        "no_answer": 1,
        "no_reasoning": 0,
        "bad_format": 0,
        "wrong_answer": 1,
    }
    accepted = read_jsonl(out / "expert.jsonl")
    assert [r["id"] for r in accepted] == ["a#e0", "b#e1"]
    gold = {p.id: p for p in _problems()}
    for r in accepted:
        assert accuracy_reward(r["response"], gold[r["problem_id"]].answer) == 1.0
        assert format_reward(r["response"]) == 1.0
        assert r["origin"] == "expert" and r["expert_source"] == "file"
    # the wrong trajectory is listed as a reject and absent from the SFT rows
    rejects = read_jsonl(out / "rejects.jsonl")
    assert {(r["id"], r["reason"]) for r in rejects} == {
        ("b", "wrong_answer"),
        ("c", "no_answer"),
        ("d", "no_candidate"),
    }
    assert all("13" not in r["response"] for r in accepted)
    assert "| wrong_answer | 1 |" in (out / "report.md").read_text()
    assert report["by_category"]["arith"] == {"prompts": 2, "solved": 2}


def test_solver_source_on_synthetic_tasks(tmp_path, scorer):
    write_synthetic_dataset(tmp_path / "synth", n=12, seed=3, test_frac=0.0)
    problems = load_problems([tmp_path / "synth" / "train.jsonl"], DataConfig(), None).problems
    report = run_expert(
        problems, SolverExpert(), scorer, keep_per_prompt=1, out_dir=tmp_path / "out"
    )
    assert report["accepted"] == len(problems) == report["prompts_solved"]
    rows = read_jsonl(tmp_path / "out" / "expert.jsonl")
    assert [r["response"] for r in rows] == [p.expert for p in problems]
    # image paths are rewritten relative to the output file and still load
    reloaded = load_problems([tmp_path / "out" / "expert.jsonl"], DataConfig(), None).problems
    assert sum(bool(p.images) for p in reloaded) == sum(bool(p.images) for p in problems) > 0
    assert all(len(p.load_images()) == len(p.images) for p in reloaded[:3])


def test_local_source_through_a_rollout_engine(tmp_path, make_model, scorer):
    engine = StubEngine(
        {
            "a": ["Thinking.\nThe answer is 7.", solved("7")],
            "b": [solved("11"), solved("10")],
            "c": [solved("B")],
            "d": ["<think>x=3</think><answer>3</answer>"],
        }
    )
    source = LocalModelExpert(make_model(engine), SamplingParams(n=2))
    report = run_expert(_problems(), source, scorer, keep_per_prompt=2, out_dir=tmp_path)
    assert engine.calls[0][1].n == 2
    ids = [r["id"] for r in read_jsonl(tmp_path / "expert.jsonl")]
    assert ids == ["a#e0", "a#e1", "c#e0", "c#e1", "d#e0", "d#e1"]
    assert report["rejected"]["wrong_answer"] == 2 and report["prompts_unsolved"] == 1


def test_build_expert_source_checks_its_config(tmp_path):
    assert isinstance(
        build_expert_source(ExpertConfig(), system_prompt="", cache_dir=tmp_path), SolverExpert
    )
    with pytest.raises(ValueError, match="local"):
        build_expert_source(
            ExpertConfig(source="local", local_hf_dir="x"), system_prompt="", cache_dir=tmp_path
        )
