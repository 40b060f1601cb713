"""The spec: straightforward PyTorch that materialises the ``[T, V]`` logits.

Used by the tests and the benchmark only. Everything is computed in fp32 from the (possibly
bf16) inputs; autograd gives the reference gradients. Full vocabulary only (no tensor
parallelism): the parallel implementations are checked against it over the whole vocabulary.
Losses on top (the GRPO objective is ``algorithms.grpo_loss``) are checked over these
log-probs against the same loss over the fused ones.

Legend: T tokens, H hidden size, V vocabulary rows of the weight (incl. padding).
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
