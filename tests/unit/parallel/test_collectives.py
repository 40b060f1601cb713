"""The trainer's small collectives: their values on 2 gloo ranks, and the rule that every
tensor they hand to a collective lives on ``ctx.device`` (NCCL, the GPU backend, has no CPU
tensors), checked against a context whose device is not the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_metis.config import ParallelConfig
from megatron_metis.parallel import (
    DistributedEnv,
    ParallelContext,
    broadcast_from_generator,
    from_last_stage,
    global_count,
    init_parallel,
    max_over_dp,
    spawn,
    sum_over_dp,
)


class _Handed(Exception):
    """Raised by the recording all-reduce: a ``meta`` tensor has no values to read back."""


def _meta_context() -> ParallelContext:
    """DP=2 x CP=2 on a device that is not the CPU (``meta`` stands in for a CUDA device)."""
    group = object()
    return ParallelContext(
        env=DistributedEnv(0, 4, 0, "127.0.0.1", 29500, "single"),
        device=torch.device("meta"),
        backend="nccl",
        tp=1,
        pp=1,
        cp=2,
        dp=2,
        tp_rank=0,
        pp_rank=0,
        cp_rank=0,
        dp_rank=0,
        sequence_parallel=False,
        tp_group=group,
        pp_group=group,
        cp_group=group,
        dp_group=group,
        dp_cp_group=group,
        pg_collection=None,
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda ctx: sum_over_dp(ctx, {"tokens": 3.0, "seqs": 1.0}),
        lambda ctx: sum_over_dp(ctx, {"nll": 2.5}, with_cp=True),
        lambda ctx: max_over_dp(ctx, {"response_length_max": 7.0}),
        lambda ctx: global_count(ctx, 5),
    ],
    ids=["sum_over_dp", "sum_over_dp_cp", "max_over_dp", "global_count"],
)
def test_control_tensors_live_on_the_context_device(monkeypatch, call):
    handed: list[torch.Tensor] = []

    def record(tensor, *args, **kwargs):
        handed.append(tensor)
        raise _Handed

    monkeypatch.setattr(dist, "all_reduce", record)
    ctx = _meta_context()
    with pytest.raises(_Handed):
        call(ctx)
    assert [(t.device, t.dtype) for t in handed] == [(ctx.device, torch.float64)]


def _worker(layout: dict[str, int]) -> dict:
    torch.set_num_threads(1)
    ctx = init_parallel(ParallelConfig(timeout_s=60, **layout))
    r = ctx.rank
    out = {
        "sum": sum_over_dp(ctx, {"a": 1.0 + r, "b": 10.0 * r}),
        "max": max_over_dp(ctx, {"m": float(r)}),
        "count": global_count(ctx, 3 + r),
        "generator": broadcast_from_generator(ctx, {"from": r}),
        "last_stage": from_last_stage(ctx, ("stage", ctx.pp_rank)),
    }
    ctx.destroy()
    return out


def test_reductions_over_two_data_parallel_ranks():
    for rank, out in enumerate(spawn(_worker, 2, {}, timeout_s=120)):
        assert out["sum"] == {"a": 3.0, "b": 10.0}
        assert out["max"] == {"m": 1.0}
        assert out["count"] == 7.0
        assert out["generator"] == {"from": rank}  # each rank is its own replica's generator
        assert out["last_stage"] == ("stage", 0)


def test_objects_reach_every_stage_of_a_pipeline():
    for rank, out in enumerate(spawn(_worker, 2, {"pp": 2}, timeout_s=120)):
        assert out["generator"] == {"from": 0}  # stage 0 generates
        assert out["last_stage"] == ("stage", 1)
        assert out["sum"] == {"a": 1.0 + rank, "b": 10.0 * rank}  # DP=1: this rank's own
        assert out["count"] == 3.0 + rank
