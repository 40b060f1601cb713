"""``metis pipeline`` orchestration: stage order, checkpoints handed from stage to stage, and a
rerun after a crash that continues where it stopped (phases and stages replaced by fakes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_metis.config import load_config
from megatron_metis.stages import pipeline
from megatron_metis.stages.runner import run_stage

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def recipe(tmp_path):
    phase = ROOT / "examples" / "recipes" / "sft-tiny-qwen2.5vl-cpu.yaml"
    rl = ROOT / "examples" / "recipes" / "grpo-tiny-qwen2.5vl-cpu.yaml"
    raw = {
        "run": {"output_dir": str(tmp_path / "run")},
        "data": {"train_files": ["train.jsonl"], "test_files": ["test.jsonl"]},
        "pipeline": {
            "warmup_recipe": str(phase),
            "rl_recipe": str(rl),
            "sft_recipe": str(phase),
            "rl_overrides": ["train.max_steps=3"],
            "rounds": 2,
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Fakes:
    def __init__(self, crash_on: str | None = None):
        self.calls: list[tuple] = []
        self.seeds: list[tuple[int, int]] = []
        self.crash_on = crash_on

    def train_phase(self, phase, cfg):
        out = Path(cfg.run.output_dir)
        self.calls.append(("train", phase, out.name, str(cfg.model.hf_dir), cfg.data.train_files))
        self.seeds.append((cfg.run.seed, cfg.rollout.seed))
        if self.crash_on == out.name + "/" + out.parent.name:
            raise KeyboardInterrupt("killed")
        (out / "hf").mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "phase": phase, "loss": 1.0}))
        return {"loss": 1.0}

    def stage(self, name):
        def step(cfg, *args, force=False, **kwargs):
            out = Path(args[-1])
            self.calls.append((name, str(args[0]), out.name))

            def work(folder):
                if name == "eval":
                    eval_json = {"label": kwargs["label"], "datasets": {"test": {"accuracy": 0.5}}}
                    (folder / "eval.json").write_text(json.dumps(eval_json))
                return {}

            return run_stage(name, out, work, force=force)

        return step


def _install(monkeypatch, fakes):
    monkeypatch.setattr(pipeline, "train_phase", fakes.train_phase)
    for name in ("triage_step", "expert_step", "sft_mix_step", "eval_step"):
        monkeypatch.setattr(pipeline, name, fakes.stage(name.removesuffix("_step")))
    monkeypatch.setattr(pipeline, "write_report", lambda evals, out, **kw: {"evals": evals})


def test_stages_run_in_order_and_hand_over_checkpoints(recipe, monkeypatch):
    fakes = Fakes()
    _install(monkeypatch, fakes)
    result = pipeline.run_metis_rise(load_config(recipe))
    run = Path(load_config(recipe).run.output_dir)
    trains = [c for c in fakes.calls if c[0] == "train"]
    assert [(c[1], c[2]) for c in trains] == [
        ("sft", "warmup"),
        ("rl", "rl"),
        ("sft", "sft"),
        ("rl", "rl"),
        ("sft", "sft"),
    ]
    assert trains[1][3] == str(run / "warmup" / "hf")  # RL starts from the warm-up policy
    assert trains[2][3] == str(run / "round1" / "rl" / "hf")  # SFT starts from RL
    assert trains[2][4] == [str(run / "round1" / "sft_data" / "sft.jsonl")]
    assert trains[3][3] == str(run / "round1" / "sft" / "hf")  # round 2 RL from round 1 SFT
    assert list(result["evals"]) == ["base", "rl", "rl_sft", "rl_r2", "rl_sft_r2"]
    assert trains[0][4] == trains[1][4] == ["train.jsonl"]  # no warm-up data: the RL data


def test_the_warm_up_trains_on_its_own_files(recipe, monkeypatch):
    fakes = Fakes()
    _install(monkeypatch, fakes)
    cfg = load_config(recipe, ["pipeline.warmup_train_files=[warm.jsonl]"])
    pipeline.run_metis_rise(cfg)
    trains = [c for c in fakes.calls if c[0] == "train"]
    assert trains[0][4] == ["warm.jsonl"]
    assert trains[1][4] == ["train.jsonl"]  # RL keeps the pipeline's data


def test_rerun_after_a_crash_continues_where_it_stopped(recipe, monkeypatch):
    crashing = Fakes(crash_on="sft/round1")
    _install(monkeypatch, crashing)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_metis_rise(load_config(recipe))
    done = [c for c in crashing.calls if c[0] != "train"]
    assert [c[0] for c in done] == ["eval", "triage", "expert", "sft_mix"]

    resumed = Fakes()
    _install(monkeypatch, resumed)
    pipeline.run_metis_rise(load_config(recipe))
    trains = [(c[1], c[2]) for c in resumed.calls if c[0] == "train"]
    # warm-up and round-1 RL are done: the rerun starts at the SFT that was killed.
    assert trains[:1] == [("sft", "sft")]
    assert ("rl", "rl") in trains[1:]


def test_the_pipeline_seed_seeds_every_phase(recipe, monkeypatch):
    fakes = Fakes()
    _install(monkeypatch, fakes)
    pipeline.run_metis_rise(load_config(recipe, ["run.seed=7"]))
    phases = [c[1] for c in fakes.calls if c[0] == "train"]
    assert phases == ["sft", "rl", "sft", "rl", "sft"]
    assert [seed for seed, _ in fakes.seeds] == [7] * 5
    assert [fakes.seeds[1][1], fakes.seeds[3][1]] == [8, 9]  # RL rollouts: seed + round


def test_an_edited_recipe_redoes_the_changed_phase_and_what_was_built_on_it(recipe, monkeypatch):
    _install(monkeypatch, Fakes())
    pipeline.run_metis_rise(load_config(recipe))

    rerun = Fakes()
    _install(monkeypatch, rerun)
    pipeline.run_metis_rise(load_config(recipe))
    assert [c for c in rerun.calls if c[0] == "train"] == []  # nothing changed: all skipped

    edited = Fakes()
    _install(monkeypatch, edited)
    pipeline.run_metis_rise(load_config(recipe, ["pipeline.sft_overrides=[train.max_steps=7]"]))
    trains = [(c[1], c[2]) for c in edited.calls if c[0] == "train"]
    # warm-up and round-1 RL kept; round-1 SFT redone, and round 2's RL that started from it
    assert trains == [("sft", "sft"), ("rl", "rl"), ("sft", "sft")]
    run = Path(load_config(recipe).run.output_dir)
    assert (run / "round1" / "sft.replaced-1" / "hf").is_dir()
    assert not (run / "warmup.replaced-1").exists()
