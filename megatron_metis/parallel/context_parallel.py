"""Context parallelism: which positions of a sequence a CP rank holds, and moving between the
full sequence and a rank's shard.

Megatron-Core's layout (the one its RoPE slicing, ``get_pos_emb_on_this_cp_rank``, assumes): a
sequence of S positions is cut into ``2 * cp`` equal chunks and CP rank r holds chunks r and
``2 * cp - 1 - r``. With causal attention the early chunks are cheap and the late ones dear, so
pairing one of each balances the ranks' work. S must be a multiple of ``2 * cp``.

Legend: S full length, s = S / cp local length.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def cp_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions [s] held by ``cp_rank``, in the order the rank stores them."""
    chunks = 2 * cp_size
    if seq_len % chunks:
        raise ValueError(
            f"context parallelism over {cp_size} ranks needs sequence lengths divisible by "
            f"{chunks} (2 * parallel.cp); got {seq_len}"
        )
    size = seq_len // chunks
    first = torch.arange(cp_rank * size, (cp_rank + 1) * size)
    second_chunk = chunks - 1 - cp_rank
    second = torch.arange(second_chunk * size, (second_chunk + 1) * size)
    return torch.cat([first, second])


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def shard_sequence(t: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This CP rank's positions of ``t`` along ``dim`` (``t`` itself when CP is off)."""
    size, rank = _group_size_rank(group)
    if size == 1:
        return t
    idx = cp_positions(t.shape[dim], size, rank).to(t.device)
    return t.index_select(dim, idx)


def _natural_order(size: int, local_len: int) -> torch.Tensor:
    """Index that turns the rank-ordered concatenation of all shards into positions 0..S-1."""
    held = torch.cat([cp_positions(local_len * size, size, r) for r in range(size)])
    return torch.argsort(held)


class _GatherSequence(torch.autograd.Function):
    """All-gather of the CP shards along ``dim`` into the full sequence.

    Backward: every rank's gradient w.r.t. the full tensor is summed over the group
    (all-reduce) and each rank keeps its own positions. A reduce-scatter would move less data,
    but gloo has none; the CPU runs this path, GPUs use Transformer Engine's CP attention.
    """

    @staticmethod
    def forward(ctx, t, dim, group):
        size, rank = _group_size_rank(group)
        t = t.contiguous()  # gloo: receive buffers and the sent tensor must be dense
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t, group=group)
        order = _natural_order(size, t.shape[dim]).to(t.device)
        ctx.dim, ctx.group, ctx.size, ctx.rank = dim, group, size, rank
        return torch.cat(parts, dim=dim).index_select(dim, order)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        idx = cp_positions(grad.shape[ctx.dim], ctx.size, ctx.rank).to(grad.device)
        return grad.index_select(ctx.dim, idx), None, None


def gather_sequence(t: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The full sequence from every CP rank's shard of it (differentiable; ``t`` when CP is
    off). Collective over ``group``."""
    size, _ = _group_size_rank(group)
    if size == 1:
        return t
    return _GatherSequence.apply(t, dim, group)
