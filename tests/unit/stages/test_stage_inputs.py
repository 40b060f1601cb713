"""Stale stages: a stage rerun with other inputs (config, data, an upstream stage that was redone)
is redone, its old folder kept, instead of being skipped on the strength of its marker."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from megatron_metis.config import load_config
from megatron_metis.stages import steps
from megatron_metis.stages.runner import (
    INPUTS_FILE,
    atomic_write_text,
    mark_done,
    run_stage,
    stage_digest,
)

ROOT = Path(__file__).resolve().parents[3]


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, folder: Path) -> dict:
        self.calls += 1
        atomic_write_text(folder / "out.txt", f"run {self.calls}")
        return {"run": self.calls}


def test_same_inputs_skip_and_changed_inputs_redo_keeping_the_old_folder(tmp_path, caplog):
    work, stage = Counter(), tmp_path / "s"
    run_stage("s", stage, work, inputs={"cfg": {"k": 2, "lr": 0.1}})
    assert run_stage("s", stage, work, inputs={"cfg": {"lr": 0.1, "k": 2}})["skipped"] is True
    assert work.calls == 1

    with caplog.at_level(logging.WARNING):
        again = run_stage("s", stage, work, inputs={"cfg": {"k": 4, "lr": 0.1}})
    assert again["skipped"] is False and again["run"] == 2
    assert "cfg.k: 2 -> 4" in caplog.text and "lr" not in caplog.text
    assert (stage / "out.txt").read_text() == "run 2"
    assert (tmp_path / "s.replaced-1" / "out.txt").read_text() == "run 1"  # nothing lost
    assert json.loads((stage / INPUTS_FILE).read_text()) == {"cfg": {"k": 4, "lr": 0.1}}


def test_a_killed_stage_with_other_inputs_does_not_resume_from_their_progress(tmp_path):
    stage = tmp_path / "s"

    def killed(folder: Path) -> None:
        (folder / "progress.jsonl").write_text('{"id": "a"}\n')
        raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        run_stage("s", stage, killed, inputs={"k": 1})
    seen = []
    run_stage("s", stage, lambda f: seen.append((f / "progress.jsonl").exists()), inputs={"k": 2})
    assert seen == [False]
    assert (tmp_path / "s.replaced-1" / "progress.jsonl").exists()


def test_a_folder_without_recorded_inputs_is_redone_and_force_starts_from_scratch(tmp_path):
    work, stage = Counter(), tmp_path / "s"
    stage.mkdir()
    mark_done(stage, {"run": 0})  # a stage finished before inputs were recorded
    assert run_stage("s", stage, work, inputs={"k": 1})["run"] == 1
    assert run_stage("s", stage, work, inputs={"k": 1}, force=True)["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "s.replaced-1", "s.replaced-2"]
    assert run_stage("s", stage, work)["skipped"] is True  # no inputs given: no check


def test_stage_digest_changes_when_the_stage_is_redone(tmp_path):
    work, stage = Counter(), tmp_path / "s"
    assert stage_digest(stage) is None
    run_stage("s", stage, work, inputs={"k": 1})
    first = stage_digest(stage)
    run_stage("s", stage, work, inputs={"k": 1}, force=True)
    assert first is not None and stage_digest(stage) not in (None, first)


def _fake_triage_internals(monkeypatch, calls: list) -> None:
    class Model:
        tokenizer = None

    # a client is a context manager (it closes its engine)
    monkeypatch.setattr(steps, "load_client", lambda *a, **k: contextlib.nullcontext(Model()))
    monkeypatch.setattr(steps, "_problems", lambda *a, **k: [])
    monkeypatch.setattr(steps, "RewardScorer", lambda cfg: contextlib.nullcontext())

    def run_triage(problems, model, scorer, cfg, **kwargs):
        calls.append(cfg.k)
        return {"buckets": {}}

    monkeypatch.setattr(steps, "run_triage", run_triage)


def test_triage_is_redone_when_its_config_data_or_checkpoint_changes(tmp_path, monkeypatch):
    calls: list[int] = []
    _fake_triage_internals(monkeypatch, calls)
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"id": "p1"}\n')
    rl = tmp_path / "rl"
    mark_done(rl)
    cfg = load_config(None, [f"triage.data_files=[{pool}]"])

    def triage(cfg):
        return steps.triage_step(cfg, rl / "hf", tmp_path / "triage")

    triage(cfg)
    assert triage(cfg)["skipped"] is True
    triage(load_config(None, [f"triage.data_files=[{pool}]", "triage.k=4"]))  # config
    pool.write_text('{"id": "p2"}\n')
    cfg = load_config(None, [f"triage.data_files=[{pool}]", "triage.k=4"])
    triage(cfg)  # regenerated data
    mark_done(rl, {"redone": True})
    triage(cfg)  # the RL stage was redone
    assert triage(cfg)["skipped"] is True
    assert calls == [0, 4, 4, 4]  # triage.k: the default, then 4
    assert len(list(tmp_path.glob("triage.replaced-*"))) == 3
