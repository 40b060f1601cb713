"""Evaluation (greedy, pass@k, categories, resume), the SFT mix, the report and plots, and the
stage runner's skip / resume semantics."""

from __future__ import annotations

import json
import math

import pytest
from stage_helpers import TRUNCATED, StubEngine, problem, solved

from megatron_metis.config.rl import RolloutConfig
from megatron_metis.config.stages import EvalConfig, PipelineConfig
from megatron_metis.data.io import ProgressLog, read_jsonl
from megatron_metis.stages.evaluation import dataset_names, evaluate, pass_at_k
from megatron_metis.stages.report import ACCURACY_KEYS, LOSS_KEYS, metric_series, write_report
from megatron_metis.stages.runner import atomic_write_text, is_done, run_stage
from megatron_metis.stages.sft_mix import build_sft_mix, mix_counts, mix_sft_rows


def test_pass_at_k_values():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    assert pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def _datasets():
    geo = [problem("g1", "1", category="geo"), problem("g2", "2", category="geo")]
    alg = [problem("a1", "3", category="alg"), problem("a2", "4", category="alg")]
    return {"setA": geo + alg, "setB": [problem("b1", "5", category="alg")]}


def _script():
    # greedy (temperature 0) answers sample 0; sampled: the list cycles
    return {
        "g1": [solved("1"), solved("0"), solved("0"), solved("0")],  # 1/4
        "g2": [solved("9"), solved("2"), solved("2"), solved("9")],  # 2/4
        "a1": [solved("3")],  # 4/4
        "a2": ["nothing"],  # 0/4
        "b1": [solved("0"), solved("5")],  # 2/4
    }


def test_greedy_accuracy_per_dataset_and_category(tmp_path, make_model, scorer):
    engine = StubEngine(_script())
    res = evaluate(
        _datasets(),
        make_model(engine),
        scorer,
        EvalConfig(),
        rollout=RolloutConfig(),
        out_dir=tmp_path,
        label="rl",
    )
    assert all(p.temperature == 0.0 and p.n == 1 for _, p in engine.calls)
    a = res["datasets"]["setA"]
    assert a["accuracy"] == 0.5 and a["num_problems"] == 4
    assert a["categories"]["geo"]["accuracy"] == 0.5
    assert a["categories"]["alg"]["accuracy"] == 0.5
    assert res["datasets"]["setB"]["accuracy"] == 0.0
    assert res["average"] == 0.25
    assert json.loads((tmp_path / "eval.json").read_text()) == res
    md = (tmp_path / "eval.md").read_text()
    assert "| setA | 4 | 50.0 |" in md and "## setA by category" in md


def test_sampled_pass_at_k(tmp_path, make_model, scorer):
    cfg = EvalConfig(mode="sampled", num_samples=4, pass_k=[1, 2, 4], temperature=0.8)
    engine = StubEngine(_script())
    res = evaluate(
        _datasets(),
        make_model(engine),
        scorer,
        cfg,
        rollout=RolloutConfig(),
        out_dir=tmp_path,
    )
    assert all(p.n == 4 and p.temperature == 0.8 for _, p in engine.calls)
    a = res["datasets"]["setA"]
    assert a["accuracy"] == pytest.approx((0.25 + 0.5 + 1.0 + 0.0) / 4)
    expected2 = (pass_at_k(4, 1, 2) + pass_at_k(4, 2, 2) + 1.0 + 0.0) / 4
    assert a["pass@k"]["2"] == pytest.approx(expected2)
    assert a["pass@k"]["4"] == pytest.approx(0.75)
    assert a["pass@k"]["1"] == pytest.approx(a["accuracy"])
    assert a["categories"]["geo"]["pass@k"]["4"] == 1.0
    assert "pass@2" in (tmp_path / "eval.md").read_text()


def test_truncated_share_is_reported(tmp_path, make_model, scorer):
    # g1: 2 of 4 samples cut at the token limit before their answer
    cut = "<think> I see one, two" + TRUNCATED
    script = {
        "g1": [solved("1"), cut, solved("1"), cut],
        "g2": [solved("2")],
    }
    cfg = EvalConfig(mode="sampled", num_samples=4, pass_k=[1], temperature=0.8)
    res = evaluate(
        {"setA": [problem("g1", "1", category="geo"), problem("g2", "2", category="alg")]},
        make_model(StubEngine(script)),
        scorer,
        cfg,
        rollout=RolloutConfig(),
        out_dir=tmp_path,
    )
    a = res["datasets"]["setA"]
    assert a["truncated"] == pytest.approx(2 / 8)
    assert a["categories"]["geo"]["truncated"] == pytest.approx(0.5)
    assert a["categories"]["alg"]["truncated"] == 0.0
    assert a["categories"]["geo"]["accuracy"] == pytest.approx(0.5)
    md = (tmp_path / "eval.md").read_text()
    assert "| pass@1 | truncated |" in md and "| geo | 1 | 50.0 | 50.0 | 50.0 |" in md


def test_eval_resumes_per_dataset(tmp_path, make_model, scorer):
    cfg = EvalConfig(prompts_per_batch=2)
    killed = StubEngine(_script(), fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(
            _datasets(),
            make_model(killed),
            scorer,
            cfg,
            rollout=RolloutConfig(),
            out_dir=tmp_path,
        )
    again = StubEngine(_script())
    res = evaluate(
        _datasets(),
        make_model(again),
        scorer,
        cfg,
        rollout=RolloutConfig(),
        out_dir=tmp_path,
    )
    assert again.requested_ids == ["b1"]
    assert res["datasets"]["setA"]["accuracy"] == 0.5


def test_dataset_names_are_unique():
    assert list(dataset_names(["x/a.jsonl", "y/a.jsonl", "b.parquet"])) == ["a", "a_2", "b"]


@pytest.mark.parametrize(
    "n_self,n_expert,frac,expected",
    [
        (10, 10, -1.0, (10, 10)),
        (10, 10, 0.5, (10, 10)),
        (10, 30, 0.5, (10, 10)),
        (30, 10, 0.5, (10, 10)),
        (30, 10, 0.2, (30, 8)),
        (10, 10, 0.0, (10, 0)),
        (10, 10, 1.0, (0, 10)),
        (0, 5, 0.5, (0, 0)),
    ],
)
def test_mix_counts(n_self, n_expert, frac, expected):
    assert mix_counts(n_self, n_expert, expert_fraction=frac) == expected


def test_mix_is_seeded_and_capped():
    self_rows = [{"id": f"s{i}"} for i in range(20)]
    expert_rows = [{"id": f"e{i}"} for i in range(10)]
    rows, stats = mix_sft_rows(self_rows, expert_rows, expert_fraction=0.25, max_samples=8, seed=3)
    again, _ = mix_sft_rows(self_rows, expert_rows, expert_fraction=0.25, max_samples=8, seed=3)
    assert rows == again and len(rows) == 8
    assert stats["self_distill"] == 6 and stats["expert"] == 2
    assert sum(r["id"].startswith("e") for r in rows) == 2


def test_build_sft_mix_rebases_images(tmp_path):
    (tmp_path / "t" / "images").mkdir(parents=True)
    (tmp_path / "t" / "images" / "x.png").write_bytes(b"png")
    self_file = tmp_path / "t" / "self_distill.jsonl"
    self_file.write_text(
        json.dumps(
            {
                "id": "p#s0",
                "question": "q",
                "answer": "1",
                "images": ["images/x.png"],
                "response": "r",
            }
        )
        + "\n"
    )
    expert_file = tmp_path / "e" / "expert.jsonl"
    expert_file.parent.mkdir()
    expert_file.write_text(
        json.dumps({"id": "q#e0", "question": "q", "answer": "2", "response": "r2"}) + "\n"
    )
    out = tmp_path / "sft" / "sft.jsonl"
    stats = build_sft_mix([self_file], [expert_file], PipelineConfig(), out_file=out)
    assert stats["total"] == 2
    rows = read_jsonl(out)
    assert (out.parent / rows[0]["images"][0]).resolve() == (tmp_path / "t/images/x.png").resolve()


def _eval(accs: dict[str, float]) -> dict:
    return {
        "label": "",
        "mode": "greedy",
        "num_samples": 1,
        "pass_k": [1],
        "datasets": {
            k: {"accuracy": v, "num_problems": 10, "pass@k": {}, "categories": {}}
            for k, v in accs.items()
        },
    }


def test_write_report_table_and_plots(tmp_path):
    rows = [
        {
            "phase": "rl",
            "step": s,
            "accuracy": 0.1 * s,
            "response_length/mean": 20 + s,
            "loss": -0.5,
        }
        for s in range(1, 6)
    ]
    rows.append({"phase": "rl", "step": 5, "accuracy": 0.9, "response_length/mean": 30})
    rows += [{"phase": "sft", "step": s, "loss": 2.0 / s} for s in range(1, 4)]
    rl_metrics = tmp_path / "metrics.jsonl"
    rl_metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft_metrics = rl_metrics  # one run folder holding both phases
    key, steps, values = metric_series(read_jsonl(rl_metrics), ACCURACY_KEYS, phase="rl")
    assert key == "accuracy" and steps == [1, 2, 3, 4, 5]
    assert values == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.9])  # a re-logged step: last wins
    key, steps, values = metric_series(read_jsonl(rl_metrics), LOSS_KEYS, phase="sft")
    assert values == pytest.approx([2.0, 1.0, 2.0 / 3])
    (tmp_path / "base.json").write_text(json.dumps(_eval({"synth": 0.2, "mathvista": 0.4})))
    results = {
        "base": tmp_path / "base.json",
        "rl": _eval({"synth": 0.5, "mathvista": 0.45}),
        "rl_sft": _eval({"synth": 0.6, "mathvista": 0.5}),
    }
    out = tmp_path / "report"
    summary = write_report(results, out, rl_metrics=[rl_metrics], sft_metrics=[sft_metrics])
    assert summary["table"]["base"]["average"] == pytest.approx(0.3)
    assert summary["table"]["rl_sft"]["synth"] == 0.6
    assert summary["plots"] == ["rl_curves.png", "sft_loss.png"]
    for name in ("results.json", "results.md", "rl_curves.png", "sft_loss.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "rl_curves.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "| model | avg. | synth | mathvista |" in md
    assert "| Base | 30.0 | 20.0 | 40.0 |" in md
    assert "| RL | 47.5 | 50.0 | 45.0 |" in md
    assert "| RL+SFT | 55.0 | 60.0 | 50.0 |" in md
    assert json.loads((out / "results.json").read_text())["datasets"] == ["synth", "mathvista"]


def test_report_without_metrics_has_no_plots(tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(json.dumps({"step": 1, "other": 1.0}) + "\n")
    summary = write_report({"base": _eval({"a": 1.0})}, tmp_path / "r", rl_metrics=[metrics])
    assert summary["plots"] == []


def test_run_stage_skips_done_and_reruns_killed(tmp_path):
    calls = []

    def work(d):
        calls.append(d)
        if len(calls) == 1:
            (d / "partial").write_text("x")
            raise KeyboardInterrupt
        atomic_write_text(d / "out.txt", "result")
        return {"n": 1}

    with pytest.raises(KeyboardInterrupt):
        run_stage("s", tmp_path / "s", work)
    assert not is_done(tmp_path / "s")
    first = run_stage("s", tmp_path / "s", work)
    assert first["skipped"] is False and first["n"] == 1 and len(calls) == 2
    second = run_stage("s", tmp_path / "s", work)
    assert second["skipped"] is True and second["n"] == 1 and len(calls) == 2
    run_stage("s", tmp_path / "s", work, force=True)
    assert len(calls) == 3
    assert not list((tmp_path / "s").glob(".*.tmp"))


def test_progress_log_survives_a_cut_line(tmp_path):
    log = ProgressLog(tmp_path / "p.jsonl")
    log.append([{"id": "a", "v": 1}])
    with log.path.open("a") as f:
        f.write('{"id": "b", "v"')
    assert list(log.load()) == ["a"]
    log.append([{"id": "c", "v": 3}])
    assert list(log.load()) == ["a", "c"]
