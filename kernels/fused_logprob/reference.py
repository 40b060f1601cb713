"""The spec: straightforward PyTorch that materialises the ``[T, V]`` logits.

Used by the tests and the benchmark only. Everything is computed in fp32 from the (possibly
bf16) inputs; autograd gives the reference gradients. Full vocabulary only (no tensor
parallelism): the parallel implementations are checked against it over the whole vocabulary.

Legend: T tokens, H hidden size, V vocabulary rows of the weight (incl. padding), S sequences.
"""

from __future__ import annotations

import torch


def linear_logprob_ref(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_T: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probability of the target (and entropy) from materialised logits.

    Args:
        hidden_TH: hidden states.
        weight_VH: output weight; rows at index >= ``vocab_size`` are padding and ignored.
        targets_T: target ids; ids outside [0, vocab_size) are ignored (logprob 0, no grad).
        temperature: the logits are divided by it.
        vocab_size: the true vocabulary size (default: all rows).
        compute_entropy: also return the entropy of the tempered distribution.

    Returns:
        ``(logprobs_T, entropy_T or None)`` in fp32.
    """
    vocab_size = weight_VH.shape[0] if vocab_size is None else vocab_size
    logits_TV = hidden_TH.float() @ weight_VH[:vocab_size].float().T / temperature
    logsoftmax_TV = torch.log_softmax(logits_TV, dim=-1)
    valid_T = (targets_T >= 0) & (targets_T < vocab_size)
    index_T1 = targets_T.clamp(0, vocab_size - 1).unsqueeze(-1)
    logprobs_T = torch.where(valid_T, logsoftmax_TV.gather(-1, index_T1).squeeze(-1), 0.0)
    entropy_T = None
    if compute_entropy:
        entropy_T = -(logsoftmax_TV.exp() * logsoftmax_TV).sum(dim=-1)
    return logprobs_T, entropy_T


def grpo_loss_ref(
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
    num_global_tokens: float | None = None,
    num_global_seqs: float | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """PPO-clip (clip-higher) GRPO loss, written the obvious way.

    ``ratio = exp(logp - old)``, ``per_token = -min(ratio * A, clip(ratio, 1-lo, 1+hi) * A)``.
    token_mean: ``sum(per_token * mask) / num_global_tokens``; seq_mean: the sum over sequences
    of each sequence's mean over its valid tokens, divided by ``num_global_seqs``.
    """
    logprobs_T, _ = linear_logprob_ref(
        hidden_TH, weight_VH, targets_T, temperature=temperature, vocab_size=vocab_size
    )
    ratio_T = torch.exp(logprobs_T - old_logprobs_T.float())
    adv_T = advantages_T.float()
    clipped_T = torch.clamp(ratio_T, 1.0 - clip_low, 1.0 + clip_high)
    per_token_T = -torch.min(ratio_T * adv_T, clipped_T * adv_T)
    mask_T = mask_T.float()
    if loss_agg == "token_mean":
        return (per_token_T * mask_T).sum() / num_global_tokens
    if loss_agg != "seq_mean":
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    total = per_token_T.new_zeros(())
    for seq in torch.unique(seq_ids_T).tolist():
        in_seq_T = (seq_ids_T == seq).float() * mask_T
        if in_seq_T.sum() > 0:
            total = total + (per_token_T * in_seq_T).sum() / in_seq_T.sum()
    return total / num_global_seqs
