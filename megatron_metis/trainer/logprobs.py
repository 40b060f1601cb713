"""Per-token log-probs from vocab-parallel logits, chunked over tokens, padding columns excluded.

Each tensor-parallel rank holds the logits of its vocabulary slice ``[B, S, V_pad / tp]``. The
log-softmax of a token needs the max and the sum of exponentials over the *whole* vocabulary,
and its target logit lives on one rank only; so, chunk by chunk of ``chunk_tokens`` tokens:

    local max  -> all-reduce MAX over TP
    sum exp    -> all-reduce SUM over TP   (log Z = max + log sum)
    target     -> taken on the owning rank -> all-reduce SUM over TP

Only a ``[chunk_tokens, V_pad / tp]`` float32 block exists at any time, never the float32
softmax of the whole micro-batch. Embedding rows past the true vocabulary (``vocab_size``;
the table is padded to a multiple of 128) are masked to -inf, unlike Megatron's
``vocab_parallel_cross_entropy``, which counts them. The backward needs no communication:
``d logp / d logits = onehot - softmax`` on the local slice, recomputed chunk by chunk from the
saved ``log Z``. Temperature divides the logits first (the rollout engine's convention).

The entropy of the tempered distribution comes out of the same passes (``with_entropy``),
without gradient (a metric).

``fused_vocab_parallel_logprobs`` is the same function of the hidden states before the output
layer and this rank's output weight shard (``train.logprob_impl=fused``): the fused kernel
never holds the logits, neither forward nor backward; its entropy is detached here too.

Legend: B rows, S positions, N = B * S tokens, v = V_pad / tp local vocabulary columns,
H hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_metis.kernels.fused_logprob import fused_linear_logprob


@dataclass(frozen=True)
class VocabShard:
    """Which vocabulary columns this rank holds, and the group that holds the rest."""

    start: int
    """Global id of the first local column."""
    vocab_size: int
    """True vocabulary size: global ids >= this are padding."""
    group: dist.ProcessGroup | None
    """Tensor-parallel group (None or size 1: the whole vocabulary is local)."""

    @property
    def distributed(self) -> bool:
        return self.group is not None and dist.get_world_size(self.group) > 1


def _all_reduce(t: torch.Tensor, shard: VocabShard, op: dist.ReduceOp) -> torch.Tensor:
    if shard.distributed:
        t = t.contiguous()
        dist.all_reduce(t, op=op, group=shard.group)
    return t


def _masked_chunk(logits_nv: torch.Tensor, shard: VocabShard, temperature: float) -> torch.Tensor:
    """fp32 tempered logits of a chunk with the padding columns at -inf."""
    x_nv = logits_nv.float()
    if temperature != 1.0:
        x_nv = x_nv / temperature
    pad_from = shard.vocab_size - shard.start
    if pad_from < x_nv.shape[-1]:  # masked_fill copies: the saved logits stay untouched
        cols_v = torch.arange(x_nv.shape[-1], device=x_nv.device) >= pad_from
        x_nv = x_nv.masked_fill(cols_v, float("-inf"))
    return x_nv


def _forward_chunk(
    logits_nv: torch.Tensor, labels_n: torch.Tensor, shard: VocabShard, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target logit, log Z, entropy) of one chunk, reduced over the TP group."""
    x_nv = _masked_chunk(logits_nv, shard, temperature)
    max_n = _all_reduce(x_nv.max(dim=-1).values, shard, dist.ReduceOp.MAX)
    e_nv = torch.exp(x_nv - max_n[:, None])
    sum_n = _all_reduce(e_nv.sum(dim=-1), shard, dist.ReduceOp.SUM)
    logz_n = max_n + torch.log(sum_n)
    local_n = labels_n - shard.start
    owned_n = (local_n >= 0) & (local_n < x_nv.shape[-1])
    idx_n = local_n.clamp(0, x_nv.shape[-1] - 1)
    target_n = torch.where(owned_n, x_nv.gather(-1, idx_n[:, None]).squeeze(-1), 0.0)
    target_n = _all_reduce(target_n, shard, dist.ReduceOp.SUM)
    # sum_v p_v x_v over the local columns (padding: p = 0, x = -inf -> 0 by nan_to_num)
    px_n = _all_reduce((e_nv * x_nv.nan_to_num(neginf=0.0)).sum(-1), shard, dist.ReduceOp.SUM)
    entropy_n = logz_n - px_n / sum_n
    return target_n, logz_n, entropy_n


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_BSv, labels_BS, shard, temperature, chunk_tokens):
        flat_Nv = logits_BSv.reshape(-1, logits_BSv.shape[-1])
        labels_N = labels_BS.reshape(-1).long().clamp(min=0)
        logp_N = torch.empty(flat_Nv.shape[0], dtype=torch.float32, device=flat_Nv.device)
        logz_N = torch.empty_like(logp_N)
        ent_N = torch.empty_like(logp_N)
        with torch.no_grad():
            for a in range(0, flat_Nv.shape[0], chunk_tokens):
                b = a + chunk_tokens
                target, logz, ent = _forward_chunk(flat_Nv[a:b], labels_N[a:b], shard, temperature)
                logp_N[a:b], logz_N[a:b], ent_N[a:b] = target - logz, logz, ent
        ctx.save_for_backward(logits_BSv, labels_N, logz_N)
        ctx.shard, ctx.temperature, ctx.chunk_tokens = shard, temperature, chunk_tokens
        ctx.mark_non_differentiable(ent_N)
        return logp_N.view(labels_BS.shape), ent_N.view(labels_BS.shape)

    @staticmethod
    def backward(ctx, grad_logp_BS, _grad_entropy):
        logits_BSv, labels_N, logz_N = ctx.saved_tensors
        shard, temperature, chunk = ctx.shard, ctx.temperature, ctx.chunk_tokens
        flat_Nv = logits_BSv.reshape(-1, logits_BSv.shape[-1])
        grad_N = grad_logp_BS.reshape(-1).float()
        grad_Nv = torch.empty_like(flat_Nv)
        for a in range(0, flat_Nv.shape[0], chunk):
            b = a + chunk
            p_nv = torch.exp(_masked_chunk(flat_Nv[a:b], shard, temperature) - logz_N[a:b, None])
            local_n = labels_N[a:b] - shard.start
            owned_n = (local_n >= 0) & (local_n < flat_Nv.shape[-1])
            onehot_nv = torch.zeros_like(p_nv)
            rows = torch.nonzero(owned_n).flatten()
            onehot_nv[rows, local_n[rows]] = 1.0
            g_nv = (onehot_nv - p_nv) * (grad_N[a:b, None] / temperature)
            grad_Nv[a:b] = g_nv.to(grad_Nv.dtype)
        return grad_Nv.view_as(logits_BSv), None, None, None, None


def vocab_parallel_logprobs(
    logits_BSv: torch.Tensor,
    labels_BS: torch.Tensor,
    shard: VocabShard,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs_BS, entropy_BS)`` of ``labels_BS`` under the vocab-parallel logits.

    Args:
        logits_BSv: this rank's vocabulary slice of the logits (any float dtype).
        labels_BS: global token ids; negative ids (ignore index) give a finite dummy value
            (mask them in the loss).
        shard: the local slice and the TP group.
        temperature: logits are divided by it (> 0).
        chunk_tokens: tokens per fp32 block.

    Returns:
        fp32 log-probs (differentiable w.r.t. ``logits_BSv``) and fp32 entropies (detached).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _VocabParallelLogprob.apply(logits_BSv, labels_BS, shard, temperature, chunk_tokens)


def fused_vocab_parallel_logprobs(
    hidden_BSH: torch.Tensor,
    weight_vH: torch.Tensor,
    labels_BS: torch.Tensor,
    shard: VocabShard,
    *,
    temperature: float = 1.0,
    reduce_grad_hidden: bool,
    chunk_tokens: int = 1024,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``vocab_parallel_logprobs`` of ``hidden_BSH @ weight_vH.T`` without the logits.

    Args:
        hidden_BSH: the last stage's hidden states, replicated over TP.
        weight_vH: this rank's vocabulary shard of the output weight (padding rows included).
        labels_BS, shard, temperature: as in :func:`vocab_parallel_logprobs`.
        reduce_grad_hidden: all-reduce the gradient of ``hidden_BSH`` over the TP group in the
            kernel; False when the caller's graph does it (``models.output_head``).
        chunk_tokens: tokens per chunk of the kernel's fp32 blocks.
        impl: the kernel backend (``auto``, ``torch``, ``triton``).

    Returns:
        fp32 log-probs ``[B, S]`` (differentiable w.r.t. ``hidden_BSH`` and ``weight_vH``) and
        fp32 entropies ``[B, S]`` (detached).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp_N, ent_N = fused_linear_logprob(
        hidden_BSH.reshape(-1, hidden_BSH.shape[-1]),
        weight_vH,
        labels_BS.reshape(-1),
        temperature=temperature,
        tp_group=shard.group if shard.distributed else None,
        vocab_start=shard.start,
        vocab_size=shard.vocab_size,
        compute_entropy=True,
        chunk_size=chunk_tokens,
        reduce_grad_hidden=reduce_grad_hidden,
        impl=impl,
    )
    assert ent_N is not None
    return logp_N.view(labels_BS.shape), ent_N.detach().view(labels_BS.shape)
