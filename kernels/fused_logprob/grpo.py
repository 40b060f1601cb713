"""The GRPO (PPO-clip, clip-higher) loss on top of the fused per-token log-probabilities.

The per-token objective is ``[T]``-sized PyTorch on the fused op's output. Its gradient reaches
the fused op's backward as one ``[T]`` vector, so the backward of the whole loss w.r.t. the
hidden states and the weight shard is a single fused pass over the vocabulary; the ``[T]``
ops cost nothing next to the ``T x V x H`` work. They cannot move into the forward kernel at
TP > 1 anyway: the log-probabilities exist only after the vocab-parallel collective.

Legend: T tokens (packed sequences, any TP/CP shard of them), S sequences.
"""

from __future__ import annotations

import torch

LOSS_AGGS = ("token_mean", "seq_mean")


def seq_ids_from_cu_seqlens(cu_seqlens_S1: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[S + 1]`` cumulative lengths -> ``[T]`` sequence index of each token."""
    lengths_S = (cu_seqlens_S1[1:] - cu_seqlens_S1[:-1]).long()
    if int(cu_seqlens_S1[-1]) != num_tokens:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens_S1[-1])}, expected {num_tokens}")
    index_S = torch.arange(lengths_S.numel(), device=cu_seqlens_S1.device)
    return torch.repeat_interleave(index_S, lengths_S)


def token_weights(
    mask_T: torch.Tensor,
    *,
    loss_agg: str,
    num_global_tokens: float | None,
    num_global_seqs: float | None,
    seq_ids_T: torch.Tensor | None,
    seq_num_tokens_S: torch.Tensor | None,
) -> torch.Tensor:
    """Weight of each token in the loss sum: ``loss = sum(per_token_T * weight_T)`` (fp32).

    token_mean: ``mask / num_global_tokens``. seq_mean: ``mask / (n_s * num_global_seqs)``
    where n_s is the valid-token count of the token's sequence: ``seq_num_tokens_S`` when given
    (the caller sums it over context-parallel ranks), else counted from ``mask_T`` here.
    """
    mask_T = mask_T.float()
    if loss_agg == "token_mean":
        if num_global_tokens is None:
            raise ValueError("loss_agg='token_mean' needs num_global_tokens")
        return mask_T / float(num_global_tokens)
    if loss_agg != "seq_mean":
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if num_global_seqs is None or seq_ids_T is None:
        raise ValueError("loss_agg='seq_mean' needs num_global_seqs and seq_ids_T or cu_seqlens")
    seq_ids_T = seq_ids_T.long()
    if seq_num_tokens_S is None:
        seq_num_tokens_S = torch.bincount(seq_ids_T, weights=mask_T)
    count_T = seq_num_tokens_S.float()[seq_ids_T].clamp(min=1.0)
    return mask_T / (count_T * float(num_global_seqs))


def clipped_objective(
    logprobs_T: torch.Tensor,
    old_logprobs_T: torch.Tensor,
    advantages_T: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(per_token_T, ratio_T, clipped_T)``: the PPO-clip loss per token, and where it clips.

    ``clipped_T`` marks tokens whose clipped branch is the minimum (no gradient flows).
    """
    ratio_T = torch.exp(logprobs_T - old_logprobs_T.float())
    adv_T = advantages_T.float()
    unclipped_T = ratio_T * adv_T
    clipped_obj_T = torch.clamp(ratio_T, 1.0 - clip_low, 1.0 + clip_high) * adv_T
    per_token_T = -torch.minimum(unclipped_T, clipped_obj_T)
    return per_token_T, ratio_T.detach(), (clipped_obj_T < unclipped_T).detach()


@torch.no_grad()
def loss_metrics(
    ratio_T: torch.Tensor,
    clipped_T: torch.Tensor,
    advantages_T: torch.Tensor,
    mask_T: torch.Tensor,
    entropy_T: torch.Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
) -> dict[str, torch.Tensor]:
    """Means over this rank's valid tokens (``num_tokens`` lets the caller re-weight)."""
    mask_T = mask_T.float()
    num_tokens = mask_T.sum()
    denom = num_tokens.clamp(min=1.0)
    adv_T = advantages_T.float()
    high_T = (ratio_T > 1.0 + clip_high) & (adv_T > 0)
    low_T = (ratio_T < 1.0 - clip_low) & (adv_T < 0)
    metrics = {
        "clip_frac": (clipped_T.float() * mask_T).sum() / denom,
        "clip_frac_high": (high_T.float() * mask_T).sum() / denom,
        "clip_frac_low": (low_T.float() * mask_T).sum() / denom,
        "ratio_mean": (ratio_T * mask_T).sum() / denom,
        "ratio_max": torch.where(mask_T > 0, ratio_T, 0.0).max(),
        "num_tokens": num_tokens,
    }
    if entropy_T is not None:
        metrics["entropy_mean"] = (entropy_T.detach() * mask_T).sum() / denom
    return metrics
