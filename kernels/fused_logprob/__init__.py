"""Fused vocab-parallel output projection + per-token log-prob (and entropy).

Neither forward nor backward materialises the ``[T, V]`` logits: the forward reduces blocks of
``hidden @ weight.T`` to per-token log-sum-exp statistics (``stats.py``), the backward
recomputes them block by block and accumulates the gradients of the hidden states and of the
weight shard.

Public API:
    fused_linear_logprob(hidden_TH, weight_VH, targets_T, ...) -> (logprobs_T, entropy_T | None)
    linear_logprob_ref: the materialising PyTorch spec (tests, benchmarks).

No loss here: the GRPO objective and SFT's NLL are ``megatron_metis.algorithms`` (a layer
above), applied to these ``[T]`` log-probs. Their gradient reaches this op's backward as one
``[T]`` vector, so the backward of the whole loss is still one fused pass over the vocabulary,
and the ``[T]`` ops cost nothing next to the ``T x V x H`` work. They could not move into the
forward kernel at TP > 1 anyway: the log-probs exist only after the vocab-parallel collective.

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

Context parallelism and packed sequences: the op is per token, so a CP shard or a packed
batch of sequences is just a ``[T]`` list of tokens.

Targets outside ``[0, vocab_size)`` (e.g. -100) are ignored: log-prob 0, no gradient.

Legend: T tokens, H hidden size, V this rank's vocabulary rows (incl. padding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .function import LinearLogprobFunction, build_shard_spec, resolve_backend
from .reference import linear_logprob_ref

__all__ = ["fused_linear_logprob", "linear_logprob_ref"]


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
