"""Context-parallel layout: Megatron's load-balanced chunks, and the all-gather that puts them
back in order (forward and backward) on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from megatron_metis.config import ParallelConfig
from megatron_metis.parallel import init_parallel, spawn
from megatron_metis.parallel.context_parallel import cp_positions, gather_sequence, shard_sequence


def test_positions_pair_an_early_and_a_late_chunk():
    # 16 positions, CP=2: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert cp_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([cp_positions(24, 3, r) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))


def test_length_not_divisible_by_twice_cp_is_a_clear_error():
    with pytest.raises(ValueError, match=r"divisible by 4 \(2 \* parallel.cp\); got 10"):
        cp_positions(10, 2, 0)


def _gather_worker() -> dict:
    torch.set_num_threads(1)
    ctx = init_parallel(ParallelConfig(cp=2, timeout_s=60))
    full = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
    mine = shard_sequence(full, 1, ctx.cp_group).clone().requires_grad_(True)
    gathered = gather_sequence(mine, 1, ctx.cp_group)
    weights = torch.arange(full.numel(), dtype=torch.float32).view_as(full)
    (gathered * weights * (ctx.cp_rank + 1)).sum().backward()
    out = {"gathered": gathered.detach(), "grad": mine.grad, "rank": ctx.cp_rank}
    ctx.destroy()
    return out


def test_gather_restores_the_order_and_sums_gradients_over_ranks():
    full = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
    weights = torch.arange(full.numel(), dtype=torch.float32).view_as(full)
    for out in spawn(_gather_worker, 2, timeout_s=120):
        assert torch.equal(out["gathered"], full)
        # rank r's loss is (r + 1) * sum(x * w): each shard's gradient is (1 + 2) * w there
        idx = cp_positions(8, 2, out["rank"])
        assert torch.equal(out["grad"], 3 * weights[:, idx])
