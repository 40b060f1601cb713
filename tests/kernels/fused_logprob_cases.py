"""Shared inputs and checks for the fused logprob tests (small odd shapes).

The GRPO loss on top is ``algorithms.grpo_loss``, the trainer's one objective: its parity test
runs it over the fused and over the reference log-probs (``grpo_objective``).

Tolerances (fp32): values 1e-5 abs/rel, gradients 2e-5 abs + 1e-4 rel (measured errors are
2e-6 and 8e-6). bf16 inputs: values 1e-4 abs (fp32 math on the same bf16 inputs); gradients
within 1% of the largest reference gradient (one bf16 rounding of d logits).

Legend: T tokens, H hidden size, V vocabulary rows (incl. padding), S sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron_metis.kernels.fused_logprob import linear_logprob_ref

from megatron_metis.algorithms import grpo_loss
from megatron_metis.config.rl import GRPOConfig

NUM_TOKENS, VOCAB, PAD, HIDDEN = 37, 1007, 9, 64
SEQ_LENS = (10, 7, 12, 8)
TEMPERATURE = 0.7


@dataclass
class Case:
    hidden_TH: torch.Tensor
    weight_VH: torch.Tensor
    targets_T: torch.Tensor
    old_logprobs_T: torch.Tensor
    advantages_T: torch.Tensor
    mask_T: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_ids_T: torch.Tensor
    grad_logprobs_T: torch.Tensor
    grad_entropy_T: torch.Tensor


def make_case(dtype: torch.dtype = torch.float32, seed: int = 0) -> Case:
    """Random inputs with a padded vocabulary, an ignored target and 4 packed sequences."""
    gen = torch.Generator().manual_seed(seed)
    hidden_TH = torch.randn(NUM_TOKENS, HIDDEN, generator=gen).to(dtype)
    weight_VH = (0.3 * torch.randn(VOCAB + PAD, HIDDEN, generator=gen)).to(dtype)
    targets_T = torch.randint(0, VOCAB, (NUM_TOKENS,), generator=gen)
    targets_T[3] = -100
    targets_T[5] = VOCAB - 1
    logprobs_T, _ = linear_logprob_ref(
        hidden_TH, weight_VH, targets_T, temperature=TEMPERATURE, vocab_size=VOCAB
    )
    # old logprobs off by up to +-0.6 nats: ratios on both sides of the clip range
    old_logprobs_T = logprobs_T + 0.3 * torch.randn(NUM_TOKENS, generator=gen)
    cu_seqlens = torch.tensor([0, *torch.tensor(SEQ_LENS).cumsum(0).tolist()])
    seq_ids_T = torch.repeat_interleave(torch.arange(len(SEQ_LENS)), torch.tensor(SEQ_LENS))
    mask_T = torch.rand(NUM_TOKENS, generator=gen) > 0.2
    mask_T[3] = False
    return Case(
        hidden_TH=hidden_TH,
        weight_VH=weight_VH,
        targets_T=targets_T,
        old_logprobs_T=old_logprobs_T,
        advantages_T=torch.randn(NUM_TOKENS, generator=gen),
        mask_T=mask_T,
        cu_seqlens=cu_seqlens,
        seq_ids_T=seq_ids_T,
        grad_logprobs_T=torch.randn(NUM_TOKENS, generator=gen),
        grad_entropy_T=torch.randn(NUM_TOKENS, generator=gen),
    )


def leaves(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return case.hidden_TH.clone().requires_grad_(), case.weight_VH.clone().requires_grad_()


def surrogate(case: Case, logprobs_T: torch.Tensor, entropy_T: torch.Tensor | None) -> torch.Tensor:
    """A scalar with arbitrary upstream gradients for both outputs."""
    out = (logprobs_T * case.grad_logprobs_T).sum()
    if entropy_T is not None:
        out = out + (entropy_T * case.grad_entropy_T).sum()
    return out


def grpo_objective(
    case: Case, logprobs_T: torch.Tensor, loss_agg: str, seq_ids_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``algorithms.grpo_loss`` (clip range [0.8, 1.28], no KL) of the case over ``logprobs_T``.

    The global normalisers exceed this batch's counts (other micro-batches and ranks exist).
    """
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28, loss_agg=loss_agg)
    return grpo_loss(
        logprobs_T,
        case.old_logprobs_T,
        case.advantages_T,
        case.mask_T,
        cfg=cfg,
        num_global_tokens=50.0,
        num_global_seqs=6.0,
        seq_ids=case.seq_ids_T if seq_ids_T is None else seq_ids_T,
    )


def assert_values_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4)
        return
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= 1e-2 * expected.float().abs().max().item(), err
