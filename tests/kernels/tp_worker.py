"""Body of one gloo rank of the TP=2 tests (imported by spawned processes).

Each rank holds half of the padded vocabulary (1016 rows, 1007 valid: rank 1 holds 499 valid
rows and 9 padding rows) and checks its results against the single-process full-vocabulary
reference, with the tolerances of ``fused_logprob_cases.py``: the log-probs, entropy and
their gradients, and the trainer's GRPO objective (``algorithms.grpo_loss``) over them.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from fused_logprob_cases import (
    TEMPERATURE,
    VOCAB,
    assert_grads_close,
    assert_values_close,
    grpo_objective,
    leaves,
    make_case,
    surrogate,
)
from megatron_metis.kernels.fused_logprob import fused_linear_logprob, linear_logprob_ref


def _check_logprob(impl: str, rank: int, reduce_grad_hidden: bool) -> None:
    case = make_case()
    rows = case.weight_VH.shape[0] // 2
    hidden_TH, weight_VH = leaves(case)
    ref = linear_logprob_ref(
        hidden_TH, weight_VH, case.targets_T, temperature=TEMPERATURE, vocab_size=VOCAB,
        compute_entropy=True,
    )  # fmt: skip
    grad_hidden_ref, grad_weight_ref = torch.autograd.grad(
        surrogate(case, *ref), (hidden_TH, weight_VH)
    )
    hidden_TH = case.hidden_TH.clone().requires_grad_()
    shard_VH = case.weight_VH[rank * rows : (rank + 1) * rows].clone().requires_grad_()
    out = fused_linear_logprob(
        hidden_TH, shard_VH, case.targets_T, temperature=TEMPERATURE, tp_group=dist.group.WORLD,
        vocab_size=VOCAB, compute_entropy=True, chunk_size=16, impl=impl,
        reduce_grad_hidden=reduce_grad_hidden,
    )  # fmt: skip
    grad_hidden, grad_shard = torch.autograd.grad(surrogate(case, *out), (hidden_TH, shard_VH))
    assert_values_close(out[0], ref[0], torch.float32)
    assert_values_close(out[1], ref[1], torch.float32)
    if not reduce_grad_hidden:
        dist.all_reduce(grad_hidden)
    assert_grads_close(grad_hidden, grad_hidden_ref, torch.float32)
    assert_grads_close(grad_shard, grad_weight_ref[rank * rows : (rank + 1) * rows], torch.float32)


def _check_grpo(impl: str, rank: int) -> None:
    """``algorithms.grpo_loss`` (seq_mean) over the TP=2 fused log-probs vs the full reference."""
    case = make_case()
    rows = case.weight_VH.shape[0] // 2
    common = dict(temperature=TEMPERATURE, vocab_size=VOCAB)
    hidden_TH, weight_VH = leaves(case)
    logprobs_ref_T, _ = linear_logprob_ref(hidden_TH, weight_VH, case.targets_T, **common)
    loss_ref, _ = grpo_objective(case, logprobs_ref_T, "seq_mean")
    grad_hidden_ref, grad_weight_ref = torch.autograd.grad(loss_ref, (hidden_TH, weight_VH))
    hidden_TH = case.hidden_TH.clone().requires_grad_()
    shard_VH = case.weight_VH[rank * rows : (rank + 1) * rows].clone().requires_grad_()
    logprobs_T, _ = fused_linear_logprob(
        hidden_TH, shard_VH, case.targets_T, tp_group=dist.group.WORLD, impl=impl, **common
    )
    loss, _ = grpo_objective(case, logprobs_T, "seq_mean")
    grad_hidden, grad_shard = torch.autograd.grad(loss, (hidden_TH, shard_VH))
    assert_values_close(loss, loss_ref, torch.float32)
    assert_grads_close(grad_hidden, grad_hidden_ref, torch.float32)
    assert_grads_close(grad_shard, grad_weight_ref[rank * rows : (rank + 1) * rows], torch.float32)


def run_rank(impl: str) -> None:
    """Entry point of ``megatron_metis.parallel.spawn`` (RANK, WORLD_SIZE, MASTER_* are set)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        rank = dist.get_rank()
        _check_logprob(impl, rank, reduce_grad_hidden=True)
        _check_logprob(impl, rank, reduce_grad_hidden=False)
        _check_grpo(impl, rank)
    finally:
        dist.destroy_process_group()
