"""The small collectives of the trainer: Python objects within a replica, counts over DP.

Rank 0 of each model-parallel group (TP rank 0, stage 0, CP rank 0: the generator) does the
generation and scoring; ``broadcast_from_generator`` hands the result to the rest of its
replica, ``from_last_stage`` hands what the loss computed to every stage, and ``sum_over_dp`` /
``max_over_dp`` / ``global_count`` reduce counts and metric sums over the data-parallel ranks.

Where control tensors live: every tensor these helpers hand to a collective is created on
``ctx.device`` (the current CUDA device under NCCL, the CPU under gloo), the one device every
backend of the run's groups can reduce. NCCL has no CPU tensors, so a CPU tensor all-reduced
over the data-parallel group fails the first step with DP > 1 on GPUs. Values are float64:
counts of tokens and samples stay exact (NCCL reduces float64 too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_metis.parallel.context import ParallelContext


def broadcast_from_generator(ctx: ParallelContext, obj: Any) -> Any:
    """Send a Python object from the generator (TP rank 0, stage 0, CP rank 0) to the rest of
    its replica: its TP, PP and CP peers."""
    box = [obj]
    if ctx.tp > 1:
        tp_src = dist.get_process_group_ranks(ctx.tp_group)[0]
        dist.broadcast_object_list(box, src=tp_src, group=ctx.tp_group)
    if ctx.pp > 1:
        dist.broadcast_object_list(box, src=ctx.pp_ranks[0], group=ctx.pp_group)
    if ctx.cp > 1:  # after TP and PP: every CP rank 0 holds it now
        cp_src = dist.get_process_group_ranks(ctx.cp_group)[0]
        dist.broadcast_object_list(box, src=cp_src, group=ctx.cp_group)
    return box[0]


def from_last_stage(ctx: ParallelContext, obj: Any) -> Any:
    """Send a Python object from the last pipeline stage to all stages."""
    if ctx.pp == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=ctx.pp_ranks[-1], group=ctx.pp_group)
    return box[0]


def sum_over_dp(
    ctx: ParallelContext, values: Mapping[str, float], *, with_cp: bool = False
) -> dict[str, float]:
    """Sum a dict of floats (same keys on every rank) over the data-parallel ranks.

    ``with_cp``: also over the context-parallel ranks, for sums a loss function took over
    this rank's positions only (CP ranks of one replica share its samples otherwise).
    """
    size, group = (ctx.dp * ctx.cp, ctx.dp_cp_group) if with_cp else (ctx.dp, ctx.dp_group)
    if size == 1 or not values:
        return dict(values)
    keys = sorted(values)
    reduced = _all_reduce(ctx, [values[k] for k in keys], dist.ReduceOp.SUM, group)
    return dict(zip(keys, reduced, strict=True))


def max_over_dp(ctx: ParallelContext, values: Mapping[str, float]) -> dict[str, float]:
    """The maximum of each float of a dict (same keys on every rank) over the data-parallel
    ranks."""
    if ctx.dp == 1 or not values:
        return dict(values)
    keys = sorted(values)
    reduced = _all_reduce(ctx, [values[k] for k in keys], dist.ReduceOp.MAX, ctx.dp_group)
    return dict(zip(keys, reduced, strict=True))


def global_count(ctx: ParallelContext, value: float) -> float:
    """Sum of a per-rank count over the data-parallel ranks (loss normalisers, batch sizes)."""
    if ctx.dp == 1:
        return float(value)
    return _all_reduce(ctx, [value], dist.ReduceOp.SUM, ctx.dp_group)[0]


def _all_reduce(
    ctx: ParallelContext, values: Sequence[float], op: dist.ReduceOp, group: dist.ProcessGroup
) -> list[float]:
    """All-reduce floats as one float64 tensor on ``ctx.device`` (the module's rule)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()
