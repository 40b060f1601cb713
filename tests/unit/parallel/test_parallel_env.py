"""Rank layout from torchrun / Slurm variables, and the spawn launcher's failure handling."""

from __future__ import annotations

import time

import pytest

from megatron_metis.parallel import WorkerError, detect_distributed_env, spawn
from megatron_metis.parallel.env import expand_slurm_nodelist


def test_torchrun_variables_win():
    env = detect_distributed_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n0",
            "MASTER_PORT": "1234",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("n0", 1234)


def test_slurm_srun_variables():
    env = detect_distributed_env(
        {
            "SLURM_PROCID": "9",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[007-008]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (9, 16, 1, "slurm")
    assert env.master_addr == "gpu007"
    assert env.master_port == 20000 + 123456 % 20000


def test_single_process_fallback():
    env = detect_distributed_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert env.master_port > 0


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("node5", ["node5"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def _rank_value(scale: int) -> int:
    import os

    return int(os.environ["RANK"]) * scale


def _failing_rank() -> None:
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("boom on rank 1")


def _hanging_rank() -> None:
    time.sleep(60)


def test_spawn_returns_per_rank_values():
    assert spawn(_rank_value, 2, 10, timeout_s=60) == [0, 10]


def test_spawn_reports_the_failing_rank():
    with pytest.raises(WorkerError, match="rank 1 failed(.|\n)*boom on rank 1"):
        spawn(_failing_rank, 2, timeout_s=60)


def test_spawn_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        spawn(_hanging_rank, 2, timeout_s=3)
    assert time.monotonic() - start < 20
