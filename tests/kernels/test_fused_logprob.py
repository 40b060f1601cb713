"""Parity of the chunked PyTorch and Triton (interpreter) paths with the materialising spec.

The log-probs (and entropy) are compared directly, and through the trainer's GRPO objective
(``algorithms.grpo_loss``): its value, metrics and gradients w.r.t. the hidden states and the
weight over the fused log-probs equal those over the reference log-probs. The objective's own
numbers (clipping, aggregation) are pinned by hand in ``tests/unit/algorithms``.

Shapes are small and odd (T=37, V=1007 + 9 padding rows, H=64, 4 packed sequences) so each
interpreter test takes about a second; tolerances are in ``fused_logprob_cases.py``.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from fused_logprob_cases import (
    NUM_TOKENS,
    TEMPERATURE,
    VOCAB,
    Case,
    assert_grads_close,
    assert_values_close,
    grpo_objective,
    leaves,
    make_case,
    surrogate,
)
from megatron_metis.kernels.fused_logprob import fused_linear_logprob, linear_logprob_ref

from megatron_metis.algorithms.packing import seq_ids_from_cu_seqlens

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


def _logprobs(case: Case, impl: str | None, hidden_TH, weight_VH, entropy: bool, **kwargs):
    """The reference (``impl=None``) or fused per-token log-probs (and entropy) of the case."""
    common = dict(temperature=TEMPERATURE, vocab_size=VOCAB, compute_entropy=entropy)
    if impl is None:
        return linear_logprob_ref(hidden_TH, weight_VH, case.targets_T, **common)
    return fused_linear_logprob(hidden_TH, weight_VH, case.targets_T, impl=impl, **common, **kwargs)


def _logprob_and_grads(case: Case, impl: str | None, entropy: bool, **kwargs):
    hidden_TH, weight_VH = leaves(case)
    logprobs_T, entropy_T = _logprobs(case, impl, hidden_TH, weight_VH, entropy, **kwargs)
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
    """``algorithms.grpo_loss`` over the case's reference or fused log-probs, and its grads.

    The fused op also computes the entropy (as the trainer does), which the loss leaves out:
    its backward then gets no entropy gradient. ``packing="cu_seqlens"``: the fused side's
    sequence ids come from the packed row's boundaries (``algorithms.packing``).
    """
    hidden_TH, weight_VH = leaves(case)
    chunk = {} if impl is None else {"chunk_size": 16}
    logprobs_T, entropy_T = _logprobs(case, impl, hidden_TH, weight_VH, True, **chunk)
    seq_ids_T = None
    if impl is not None and packing == "cu_seqlens":
        seq_ids_T = seq_ids_from_cu_seqlens(case.cu_seqlens, NUM_TOKENS)
    loss, metrics = grpo_objective(case, logprobs_T, loss_agg, seq_ids_T)
    return loss, torch.autograd.grad(loss, (hidden_TH, weight_VH)), metrics, entropy_T


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "loss_agg,packing",
    [("token_mean", "seq_ids"), ("seq_mean", "seq_ids"), ("seq_mean", "cu_seqlens")],
)
def test_grpo_loss_matches_reference(impl: str, loss_agg: str, packing: str) -> None:
    case = make_case()
    loss_ref, grads_ref, metrics_ref, entropy_ref = _grpo(case, None, loss_agg, packing)
    loss, grads, metrics, entropy_T = _grpo(case, impl, loss_agg, packing)
    assert_values_close(loss, loss_ref, torch.float32)
    for got, want in zip(grads, grads_ref, strict=True):
        assert_grads_close(got, want, torch.float32)
    assert 0.0 < metrics["clip_frac"].item() < 1.0  # the case exercises clipping
    assert metrics["num_tokens"].item() == case.mask_T.sum().item()
    for key in ("clip_frac", "clip_frac_high", "clip_frac_low", "ratio_mean", "ratio_max"):
        assert_values_close(metrics[key], metrics_ref[key], torch.float32)
    assert_values_close(entropy_T, entropy_ref, torch.float32)


def test_dispatch_and_errors() -> None:
    case = make_case()
    logprobs_T, _ = fused_linear_logprob(case.hidden_TH, case.weight_VH, case.targets_T)
    ref_T, _ = linear_logprob_ref(case.hidden_TH, case.weight_VH, case.targets_T)
    assert_values_close(logprobs_T, ref_T, torch.float32)  # auto on CPU: chunked
    with pytest.raises(ValueError, match="impl"):
        fused_linear_logprob(case.hidden_TH, case.weight_VH, case.targets_T, impl="cuda")
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprob(case.hidden_TH, case.weight_VH, case.targets_T, temperature=0.0)
