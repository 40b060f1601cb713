"""SIGKILL a ``metis sft`` run after a checkpoint, rerun the same command: it resumes, and the
losses of the following steps equal those of an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_helpers import base_overrides
from tiny_models import write_tiny_assets

from megatron_metis.trainer.metrics import read_metrics

STEPS = 4
KILL_AFTER = 2


def _command(hf: str, data: str, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "megatron_metis.cli.main",
        "sft",
        "--nproc",
        "1",
        "/dev/null",
        *base_overrides(hf, data, str(out)),
        "sft.response_field=expert",
        "optimizer.lr=1e-3",
        "optimizer.warmup_steps=2",
        "optimizer.decay_style=cosine",
        "checkpoint.save_interval=1",
        "checkpoint.keep_last=2",
        f"train.max_steps={STEPS}",
        "sft.global_batch_size=4",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_resume")
    hf, data = write_tiny_assets(root)
    return {"hf": hf, "data": data, "root": root}


def test_sigkill_after_a_checkpoint_then_resume_matches_uninterrupted(assets):
    hf, data, root = assets["hf"], assets["data"], assets["root"]
    full = root / "full"
    subprocess.run(_command(hf, data, full), env=_env(), check=True, capture_output=True)
    expected = read_metrics(full, "sft")
    assert sorted(expected) == list(range(1, STEPS + 1))

    killed = root / "killed"
    proc = subprocess.Popen(
        _command(hf, data, killed),
        env=_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = killed / "checkpoints" / f"step_{KILL_AFTER:07d}" / "metis_checkpoint.json"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never wrote the checkpoint to kill after"
    done_before_kill = max(read_metrics(killed, "sft"), default=0)
    assert done_before_kill < STEPS, "the run finished before it was killed"

    rerun = subprocess.run(_command(hf, data, killed), env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = read_metrics(killed, "sft")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(KILL_AFTER + 1, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6), step
        assert resumed[step]["consumed_samples"] == expected[step]["consumed_samples"]
    latest = (killed / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:07d}"
    kept = sorted(p.name for p in (killed / "checkpoints").glob("step_*"))
    assert kept == [f"step_{STEPS - 1:07d}", f"step_{STEPS:07d}"]
