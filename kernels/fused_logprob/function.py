"""The autograd Function shared by the chunked and Triton backends, and the dispatch.

A backend is a module with ``local_stats(...)`` and ``local_grads(...)`` (see ``chunked.py``);
everything vocab-parallel (target ownership, padding, the one forward collective, the
optional all-reduce of the hidden-state gradient) lives here, once.

Legend: T tokens, H hidden size, V this rank's vocabulary rows (incl. padding), Vv its valid rows.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

from . import chunked
from .stats import all_gather_stats, finalize_stats, merge_stats

IMPLS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class ShardSpec:
    """Where this rank's weight rows sit in the vocabulary, and the call's options."""

    tp_group: dist.ProcessGroup | None
    vocab_start: int
    vocab_size: int
    num_valid_rows: int
    inv_temp: float
    compute_entropy: bool
    chunk_size: int | None
    reduce_grad_hidden: bool


def build_shard_spec(
    weight_VH: torch.Tensor,
    *,
    temperature: float,
    tp_group: dist.ProcessGroup | None,
    vocab_start: int | None,
    vocab_size: int | None,
    compute_entropy: bool,
    chunk_size: int | None,
    reduce_grad_hidden: bool,
) -> ShardSpec:
    """Resolve defaults: Megatron's uniform vocab split, no padding unless ``vocab_size``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_rows = weight_VH.shape[0]
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    vocab_start = tp_rank * num_rows if vocab_start is None else vocab_start
    vocab_size = tp_size * num_rows if vocab_size is None else vocab_size
    return ShardSpec(
        tp_group=tp_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        num_valid_rows=max(0, min(num_rows, vocab_size - vocab_start)),
        inv_temp=1.0 / temperature,
        compute_entropy=compute_entropy,
        chunk_size=chunk_size,
        reduce_grad_hidden=reduce_grad_hidden,
    )


def local_targets(targets_T: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """Column of the target in this rank's valid rows, -1 where this rank does not hold it."""
    local_T = targets_T.long() - spec.vocab_start
    owner_T = (local_T >= 0) & (local_T < spec.num_valid_rows) & (targets_T < spec.vocab_size)
    return torch.where(owner_T, local_T, -1).contiguous()


def resolve_backend(impl: str, hidden_TH: torch.Tensor) -> ModuleType:
    """``torch``: chunked PyTorch; ``triton``: Triton; ``auto``: Triton on CUDA if it imports."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch" or (impl == "auto" and not hidden_TH.is_cuda):
        return chunked
    try:
        return importlib.import_module(f"{__package__}.triton_impl")
    except ImportError:
        if impl == "triton":
            raise
        return chunked


class LinearLogprobFunction(torch.autograd.Function):
    """hidden, weight shard -> (logprobs_T, entropy_T); never holds ``[T, V]`` logits."""

    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, targets_T, backend, spec):  # noqa: D102
        weight_valid = weight_VH[: spec.num_valid_rows]
        tgt_T = local_targets(targets_T, spec)
        stats_4T = backend.local_stats(
            hidden_TH,
            weight_valid,
            tgt_T,
            inv_temp=spec.inv_temp,
            compute_entropy=spec.compute_entropy,
            chunk_size=spec.chunk_size,
        )
        stats_4T = merge_stats(all_gather_stats(stats_4T, spec.tp_group))
        out = finalize_stats(
            stats_4T, targets_T, vocab_size=spec.vocab_size, compute_entropy=spec.compute_entropy
        )
        entropy_T = out.entropy_T if out.entropy_T is not None else out.lse_T.new_empty(0)
        ctx.save_for_backward(hidden_TH, weight_VH, tgt_T, out.lse_T, entropy_T, out.valid_T)
        ctx.backend, ctx.spec = backend, spec
        ctx.set_materialize_grads(False)
        return out.logprobs_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logprobs_T, grad_entropy_T):  # noqa: D102
        hidden_TH, weight_VH, tgt_T, lse_T, entropy_T, valid_T = ctx.saved_tensors
        spec: ShardSpec = ctx.spec
        if grad_logprobs_T is None:
            grad_logprobs_T = torch.zeros_like(lse_T)
        grad_logprobs_T = torch.where(valid_T, grad_logprobs_T.float(), 0.0).contiguous()
        if grad_entropy_T is not None and spec.compute_entropy:
            grad_entropy_T = grad_entropy_T.float().contiguous()
        else:
            grad_entropy_T, entropy_T = None, None
        grad_hidden_TH, grad_valid_VH = ctx.backend.local_grads(
            hidden_TH,
            weight_VH[: spec.num_valid_rows],
            tgt_T,
            lse_T,
            entropy_T,
            grad_logprobs_T,
            grad_entropy_T,
            inv_temp=spec.inv_temp,
            chunk_size=spec.chunk_size,
        )
        if spec.reduce_grad_hidden and spec.tp_group is not None:
            grad_hidden_TH = grad_hidden_TH.contiguous()
            dist.all_reduce(grad_hidden_TH, group=spec.tp_group)
        if grad_valid_VH.shape == weight_VH.shape:
            grad_weight_VH = grad_valid_VH.to(weight_VH.dtype)
        else:
            grad_weight_VH = torch.zeros_like(weight_VH)
            grad_weight_VH[: spec.num_valid_rows] = grad_valid_VH
        return grad_hidden_TH.to(hidden_TH.dtype), grad_weight_VH, None, None, None
