"""Triage: buckets on hand-made pass rates, self-distillation rules, outputs, resume."""

from __future__ import annotations

import json
import random

import pytest
from stage_helpers import StubEngine, problem, solved

from megatron_metis.config.data import DataConfig
from megatron_metis.config.rl import RolloutConfig
from megatron_metis.config.stages import TriageConfig
from megatron_metis.data.check import load_problems
from megatron_metis.data.io import read_jsonl
from megatron_metis.rewards.accuracy import accuracy_reward
from megatron_metis.rollout.client import ScoredSample
from megatron_metis.stages.triage import bucket_of, run_triage, select_self_distill


@pytest.mark.parametrize(
    "n_correct,n,bucket",
    [
        (8, 8, "mastered"),
        (1, 1, "mastered"),
        (7, 8, "self_distill"),
        (1, 8, "self_distill"),
        (4, 8, "self_distill"),
        (0, 8, "expert"),
        (0, 1, "expert"),
    ],
)
def test_bucket_of_hand_made_pass_rates(n_correct, n, bucket):
    assert bucket_of(n_correct, n) == bucket


@pytest.mark.parametrize("bad", [(9, 8), (-1, 8), (0, 0)])
def test_bucket_of_rejects_impossible_counts(bad):
    with pytest.raises(ValueError):
        bucket_of(*bad)


def _samples(spec: list[tuple[bool, int]]) -> list[ScoredSample]:
    return [
        ScoredSample(
            text=f"t{i}", correct=ok, format=1.0, num_tokens=n, finish_reason="stop", sample_index=i
        )
        for i, (ok, n) in enumerate(spec)
    ]


def test_select_self_distill_rules_keep_only_correct():
    samples = _samples([(True, 30), (False, 5), (True, 10), (True, 20), (False, 1), (True, 10)])
    samples.append(
        ScoredSample(
            text="cut",
            correct=True,
            format=0.0,
            num_tokens=2,
            finish_reason="length",
            sample_index=6,
        )
    )
    rng = random.Random(0)
    pick = lambda keep, k: [
        s.sample_index
        for s in select_self_distill(  # noqa: E731
            samples, keep=keep, k=k, rng=rng
        )
    ]
    assert pick("all", 0) == [0, 2, 3, 5]  # truncated sample 6 never kept
    assert pick("all", 2) == [0, 2]
    assert pick("shortest", 2) == [2, 5]  # tie on 10 tokens broken by sample order
    assert pick("shortest", 0) == [2, 5, 3, 0]
    r1 = [
        s.sample_index
        for s in select_self_distill(samples, keep="random", k=2, rng=random.Random(7))
    ]
    r2 = [
        s.sample_index
        for s in select_self_distill(samples, keep="random", k=2, rng=random.Random(7))
    ]
    assert r1 == r2 and len(r1) == 2 and set(r1) <= {0, 2, 3, 5}
    assert pick("random", 10) == [0, 2, 3, 5]


def _dataset():
    return [
        problem("easy", "7", source="synth", category="arith"),
        problem("mid", "12", source="synth", category="arith"),
        problem("hard", "5", source="other", category="algebra"),
        problem("mc", "B", choices=("red", "blue"), source="other", category="compare"),
    ]


def _script():
    return {
        "easy": [solved("7")],  # 4/4
        "mid": [solved("12", "a b c d e"), "no answer at all", solved("13"), solved("12")],  # 2/4
        "hard": [solved("4"), "<think> x </think><answer> 6 </answer>"],  # 0/4
        "mc": [solved("B"), solved("A"), solved("A"), solved("A")],  # 1/4
    }


def test_run_triage_buckets_rows_and_report(tmp_path, make_model, scorer):
    cfg = TriageConfig(num_samples=4, keep="all", prompts_per_batch=3)
    engine = StubEngine(_script())
    report = run_triage(
        _dataset(),
        make_model(engine),
        scorer,
        cfg,
        rollout=RolloutConfig(),
        out_dir=tmp_path,
    )
    assert report["buckets"] == {"mastered": 1, "self_distill": 2, "expert": 1}
    assert report["by_source"] == {
        "other": {"mastered": 0, "self_distill": 1, "expert": 1},
        "synth": {"mastered": 1, "self_distill": 1, "expert": 0},
    }
    assert report["by_category"]["algebra"] == {"mastered": 0, "self_distill": 0, "expert": 1}
    assert report["by_modality"] == {"text": {"mastered": 1, "self_distill": 2, "expert": 1}}
    assert report["pass_rate_histogram"] == {"0/4": 1, "1/4": 1, "2/4": 1, "4/4": 1}
    rates = {r["id"]: r for r in read_jsonl(tmp_path / "pass_rates.jsonl")}
    assert rates["mid"]["pass_rate"] == 0.5 and rates["mid"]["bucket"] == "self_distill"
    assert rates["mc"]["n_correct"] == 1
    # sampling parameters: N samples per prompt, in batches of 3 prompts
    assert [len(ids) for ids, _ in engine.calls] == [3, 1]
    assert all(p.n == 4 for _, p in engine.calls)

    rows = read_jsonl(tmp_path / "self_distill.jsonl")
    assert [r["id"] for r in rows] == ["mid#s0", "mid#s3", "mc#s0"]
    script = _script()
    gold = {p.id: p for p in _dataset()}
    for r in rows:
        # exactly as generated (minus the end-of-turn token), and verified correct
        assert r["response"] == script[r["problem_id"]][r["sample_index"]]
        p = gold[r["problem_id"]]
        assert accuracy_reward(r["response"], p.answer, choices=p.choices) == 1.0
        assert r["origin"] == "self_distill"
    # SFT rows load as problems (unique ids), p = 0 prompts go to the expert stage
    loaded = load_problems([tmp_path / "self_distill.jsonl"], DataConfig(), None).problems
    assert len(loaded) == 3 and loaded[0].extra["response"] == rows[0]["response"]
    assert [r["id"] for r in read_jsonl(tmp_path / "expert_prompts.jsonl")] == ["hard"]
    md = (tmp_path / "report.md").read_text()
    assert "| self_distill | 0 < p < 1 | 2 |" in md and "## By modality" in md
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_shortest_rule_in_the_stage(tmp_path, make_model, scorer):
    cfg = TriageConfig(num_samples=4, keep="shortest", k=1)
    run_triage(
        _dataset(),
        make_model(StubEngine(_script())),
        scorer,
        cfg,
        rollout=RolloutConfig(),
        out_dir=tmp_path,
    )
    rows = read_jsonl(tmp_path / "self_distill.jsonl")
    assert [r["id"] for r in rows] == ["mid#s3", "mc#s0"]


def test_triage_resumes_after_a_kill(tmp_path, make_model, scorer):
    cfg = TriageConfig(num_samples=4, prompts_per_batch=2)
    killed = StubEngine(_script(), fail_on_call=1)
    with pytest.raises(KeyboardInterrupt):
        run_triage(
            _dataset(),
            make_model(killed),
            scorer,
            cfg,
            rollout=RolloutConfig(),
            out_dir=tmp_path,
        )
    assert killed.requested_ids == ["easy", "mid"]
    assert not (tmp_path / "report.json").exists()
    # a crash mid-append leaves a cut line: ignored and overwritten
    with (tmp_path / "samples.jsonl").open("a") as f:
        f.write('{"id": "hard", "sampl')
    again = StubEngine(_script())
    report = run_triage(
        _dataset(),
        make_model(again),
        scorer,
        cfg,
        rollout=RolloutConfig(),
        out_dir=tmp_path,
    )
    assert again.requested_ids == ["hard", "mc"]
    assert report["buckets"] == {"mastered": 1, "self_distill": 2, "expert": 1}
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == 4
