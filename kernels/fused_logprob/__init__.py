"""Fused vocab-parallel output projection + per-token log-prob, and the GRPO loss on top.

Neither forward nor backward materialises the ``[T, V]`` logits: the forward reduces blocks of
``hidden @ weight.T`` to per-token log-sum-exp statistics (``stats.py``), the backward
recomputes them block by block and accumulates the gradients of the hidden states and of the
weight shard.

Public API:
    fused_linear_logprob(hidden_TH, weight_VH, targets_T, ...) -> (logprobs_T, entropy_T | None)
    fused_grpo_loss(hidden_TH, weight_VH, targets_T, old_logprobs_T, advantages_T, mask_T, ...)
        -> (loss, metrics)
    linear_logprob_ref, grpo_loss_ref: the materialising PyTorch spec (tests, benchmarks).

Implementations (``impl``): ``"torch"`` is chunked PyTorch (``chunked.py``: memory-bounded, the
CPU path), ``"triton"`` the Triton kernels (``triton_impl.py``; on CPU only under
``TRITON_INTERPRET=1``), ``"auto"`` picks Triton for CUDA tensors when triton imports and
chunked PyTorch otherwise. Inputs may be fp32, fp16 or bf16; logits, statistics and
accumulation are fp32; outputs are fp32, gradients come back in the inputs' dtypes.

Tensor parallelism (Megatron vocab split): ``weight_VH`` is this rank's ``[V/tp, H]`` shard of
the output weight, rows ``vocab_start .. vocab_start + V/tp`` of the (padded) vocabulary;
rows at a global index ``>= vocab_size`` are padding, excluded from the softmax, and get a zero
gradient. The forward does one collective (an ``all_gather`` of ``[4, T]`` fp32 stats).
Gradient of the hidden states: every rank's vocabulary shard contributes a partial sum. With
``reduce_grad_hidden=True`` (default) it is all-reduced over ``tp_group`` here, so it is the
full gradient for the replicated ``hidden_TH`` the caller passed. Pass ``False`` when the
caller already reduces it (Megatron's ``copy_to_tensor_model_parallel_region`` or, with
sequence parallelism, ``gather_from_sequence_parallel_region``, whose backward reduce-scatters).
The weight gradient is this rank's shard, unreduced (data-parallel reduction is the caller's).

Context parallelism and packed sequences: the ops are per token, so a CP shard or a packed
batch of sequences is just a ``[T]`` list of tokens; the loss normalisers
(``num_global_tokens``, ``num_global_seqs``, and for seq_mean under CP ``seq_num_tokens_S``)
are given by the caller, summed over the data- and context-parallel ranks.

Targets outside ``[0, vocab_size)`` (e.g. -100) are ignored: log-prob 0, no gradient.

Legend: T tokens, H hidden size, V this rank's vocabulary rows (incl. padding), S sequences.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .function import LinearLogprobFunction, build_shard_spec, resolve_backend
from .grpo import clipped_objective, loss_metrics, seq_ids_from_cu_seqlens, token_weights
from .reference import grpo_loss_ref, linear_logprob_ref

__all__ = [
    "fused_grpo_loss",
    "fused_linear_logprob",
    "grpo_loss_ref",
    "linear_logprob_ref",
]


def fused_linear_logprob(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
    reduce_grad_hidden: bool = True,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log p(target | hidden) of ``softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden_TH: hidden states before the output layer (replicated over TP).
        weight_VH: this rank's vocabulary shard of the output weight.
        targets_T: global target ids.
        temperature: the logits are divided by it.
        tp_group: the tensor-parallel group over which the vocabulary is split (None: no TP).
        vocab_start: global index of ``weight_VH[0]`` (default ``tp_rank * V``).
        vocab_size: the true vocabulary size (default ``tp_size * V``: no padding).
        compute_entropy: also return the (differentiable) entropy per token.
        chunk_size: tokens per chunk of the PyTorch path, and of the Triton backward's
            gradient buffer (default: about 256 MiB of fp32 logits).
        reduce_grad_hidden: all-reduce the hidden-state gradient over ``tp_group``.
        impl: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(logprobs_T, entropy_T or None)``, fp32, differentiable w.r.t. hidden and weight.
    """
    spec = build_shard_spec(
        weight_VH,
        temperature=temperature,
        tp_group=tp_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        compute_entropy=compute_entropy,
        chunk_size=chunk_size,
        reduce_grad_hidden=reduce_grad_hidden,
    )
    backend = resolve_backend(impl, hidden_TH)
    logprobs_T, entropy_T = LinearLogprobFunction.apply(
        hidden_TH.contiguous(), weight_VH.contiguous(), targets_T.contiguous(), backend, spec
    )
    return logprobs_T, (entropy_T if compute_entropy else None)


def fused_grpo_loss(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    mask_T: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    loss_agg: str = "token_mean",
    seq_ids_T: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    seq_num_tokens_S: torch.Tensor | None = None,
    num_global_tokens: float | None = None,
    num_global_seqs: float | None = None,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
    reduce_grad_hidden: bool = True,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss with asymmetric clipping, straight from the hidden states.

    ``ratio = exp(logp - old_logp)``; ``per_token = -min(ratio * A, clip(ratio, 1 - clip_low,
    1 + clip_high) * A)``; ``token_mean``: ``sum(per_token * mask) / num_global_tokens``;
    ``seq_mean``: sum over sequences of the mean over each one's valid tokens, divided by
    ``num_global_seqs``. Sequences are given by ``seq_ids_T`` (``[T]`` indices into ``[S]``)
    or by ``cu_seqlens`` (``[S + 1]``, packed); ``seq_num_tokens_S`` overrides the local valid
    count per sequence (needed under context parallelism). This rank's loss is a partial sum:
    summing it over DP/CP ranks gives the global loss.

    Returns:
        ``(loss, metrics)``: a scalar fp32 loss and detached scalars ``clip_frac``,
        ``clip_frac_high``, ``clip_frac_low``, ``ratio_mean``, ``ratio_max``, ``num_tokens``
        and, with ``compute_entropy``, ``entropy_mean`` (means over local valid tokens).
        The other arguments are those of :func:`fused_linear_logprob`.
    """
    if cu_seqlens is not None and seq_ids_T is None:
        seq_ids_T = seq_ids_from_cu_seqlens(cu_seqlens, targets_T.shape[0])
    weight_T = token_weights(
        mask_T,
        loss_agg=loss_agg,
        num_global_tokens=num_global_tokens,
        num_global_seqs=num_global_seqs,
        seq_ids_T=seq_ids_T,
        seq_num_tokens_S=seq_num_tokens_S,
    )
    logprobs_T, entropy_T = fused_linear_logprob(
        hidden_TH,
        weight_VH,
        targets_T,
        temperature=temperature,
        tp_group=tp_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        compute_entropy=compute_entropy,
        chunk_size=chunk_size,
        reduce_grad_hidden=reduce_grad_hidden,
        impl=impl,
    )
    per_token_T, ratio_T, clipped_T = clipped_objective(
        logprobs_T, old_logprobs_T, advantages_T, clip_low=clip_low, clip_high=clip_high
    )
    loss = (per_token_T * weight_T).sum()
    metrics = loss_metrics(
        ratio_T, clipped_T, advantages_T, mask_T, entropy_T, clip_low=clip_low, clip_high=clip_high
    )
    return loss, metrics
