"""Parity of the chunked PyTorch and Triton (interpreter) paths with the materialising spec.

Shapes are small and odd (T=37, V=1007 + 9 padding rows, H=64, 4 packed sequences) so each
interpreter test takes about a second; tolerances are in ``fused_logprob_cases.py``.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from fused_logprob_cases import (
    TEMPERATURE,
    VOCAB,
    Case,
    assert_grads_close,
    assert_values_close,
    leaves,
    make_case,
    surrogate,
)
from megatron_metis.kernels.fused_logprob import (
    fused_grpo_loss,
    fused_linear_logprob,
    grpo_loss_ref,
    linear_logprob_ref,
)
from megatron_metis.kernels.fused_logprob.grpo import clipped_objective

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

IMPLS = [
    pytest.param("torch", id="chunked"),
    pytest.param(
        "triton",
        id="triton",
        marks=[
            pytest.mark.triton_interpret,
            pytest.mark.skipif(
                not (_HAS_TRITON and _INTERPRET), reason="needs triton and TRITON_INTERPRET=1"
            ),
        ],
    ),
]


def _logprob_and_grads(case: Case, impl: str | None, entropy: bool, **kwargs):
    hidden_TH, weight_VH = leaves(case)
    common = dict(temperature=TEMPERATURE, vocab_size=VOCAB, compute_entropy=entropy)
    if impl is None:
        logprobs_T, entropy_T = linear_logprob_ref(hidden_TH, weight_VH, case.targets_T, **common)
    else:
        logprobs_T, entropy_T = fused_linear_logprob(
            hidden_TH, weight_VH, case.targets_T, impl=impl, **common, **kwargs
        )
    grads = torch.autograd.grad(surrogate(case, logprobs_T, entropy_T), (hidden_TH, weight_VH))
    return logprobs_T, entropy_T, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("entropy", [False, True], ids=["logprob", "logprob+entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprob_matches_reference(impl: str, entropy: bool, dtype: torch.dtype) -> None:
    case = make_case(dtype)
    expected = _logprob_and_grads(case, None, entropy)
    actual = _logprob_and_grads(case, impl, entropy, chunk_size=16)
    assert_values_close(actual[0], expected[0], dtype)
    assert actual[0][3] == 0.0  # ignored target
    if entropy:
        assert_values_close(actual[1], expected[1], dtype)
    else:
        assert actual[1] is None
    for got, want in zip(actual[2], expected[2], strict=True):
        assert_grads_close(got, want, dtype)
    assert torch.all(actual[2][1][VOCAB:] == 0)  # padding rows


def _grpo(case: Case, impl: str | None, loss_agg: str, packing: str):
    hidden_TH, weight_VH = leaves(case)
    args = (hidden_TH, weight_VH, case.targets_T, case.old_logprobs_T, case.advantages_T)
    kwargs = dict(
        loss_agg=loss_agg,
        num_global_tokens=50.0,
        num_global_seqs=6.0,
        temperature=TEMPERATURE,
        vocab_size=VOCAB,
    )
    if impl is None:
        loss = grpo_loss_ref(*args, case.mask_T, seq_ids_T=case.seq_ids_T, **kwargs)
        metrics = {}
    else:
        seqs = {"seq_ids_T": case.seq_ids_T} if packing == "seq_ids" else {}
        seqs = seqs or {"cu_seqlens": case.cu_seqlens}
        loss, metrics = fused_grpo_loss(
            *args, case.mask_T, impl=impl, compute_entropy=True, chunk_size=16, **seqs, **kwargs
        )
    return loss, torch.autograd.grad(loss, (hidden_TH, weight_VH)), metrics


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "loss_agg,packing",
    [("token_mean", "seq_ids"), ("seq_mean", "seq_ids"), ("seq_mean", "cu_seqlens")],
)
def test_grpo_loss_matches_reference(impl: str, loss_agg: str, packing: str) -> None:
    case = make_case()
    loss_ref, grads_ref, _ = _grpo(case, None, loss_agg, packing)
    loss, grads, metrics = _grpo(case, impl, loss_agg, packing)
    assert_values_close(loss, loss_ref, torch.float32)
    for got, want in zip(grads, grads_ref, strict=True):
        assert_grads_close(got, want, torch.float32)
    assert 0.0 < metrics["clip_frac"].item() < 1.0
    assert metrics["num_tokens"].item() == case.mask_T.sum().item()
    assert metrics["entropy_mean"].item() > 0.0


def test_clipped_objective_literal_values() -> None:
    # ratio 1.5, A=+1: clipped at 1.28. ratio 0.5, A=-1: clipped at 0.8 (loss 0.8).
    # ratio 0.5, A=+1 and ratio 1.1, A=-1: unclipped.
    logp_T = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.1]))
    adv_T = torch.tensor([1.0, -1.0, 1.0, -1.0])
    per_token_T, _, clipped_T = clipped_objective(
        logp_T, torch.zeros(4), adv_T, clip_low=0.2, clip_high=0.28
    )
    torch.testing.assert_close(per_token_T, torch.tensor([-1.28, 0.8, -0.5, 1.1]))
    assert clipped_T.tolist() == [True, True, False, False]


def test_dispatch_and_errors() -> None:
    case = make_case()
    logprobs_T, _ = fused_linear_logprob(case.hidden_TH, case.weight_VH, case.targets_T)
    ref_T, _ = linear_logprob_ref(case.hidden_TH, case.weight_VH, case.targets_T)
    assert_values_close(logprobs_T, ref_T, torch.float32)  # auto on CPU: chunked
    with pytest.raises(ValueError, match="impl"):
        fused_linear_logprob(case.hidden_TH, case.weight_VH, case.targets_T, impl="cuda")
    with pytest.raises(ValueError, match="num_global_tokens"):
        fused_grpo_loss(
            case.hidden_TH,
            case.weight_VH,
            case.targets_T,
            case.old_logprobs_T,
            case.advantages_T,
            case.mask_T,
        )
