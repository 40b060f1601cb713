"""Vocab-parallel log-sum-exp statistics shared by every implementation.

A pass over a block of vocabulary columns reduces each token's logits to four numbers, stacked
as ``stats_4T`` (or ``stats_N4T`` for N blocks, splits or tensor-parallel ranks):

- ``STAT_MAX``: m, the max of the block's valid logits (``EMPTY_MAX`` when the block has none);
- ``STAT_SUMEXP``: s = sum exp(z - m);
- ``STAT_XLOGX``: w = sum exp(z - m) * (z - m), which gives the entropy without cancellation;
- ``STAT_TARGET``: the target logit if the block holds the target column, else 0.

Blocks merge exactly (log-sum-exp rescaling), so one ``all_gather`` of ``[4, T]`` across the
tensor-parallel group is the only collective of the forward.

Legend: T tokens, N partial blocks (splits or ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

STAT_MAX, STAT_SUMEXP, STAT_XLOGX, STAT_TARGET = range(4)
NUM_STATS = 4
# A finite "minus infinity": exp(EMPTY_MAX - m) underflows to 0 and 0 * (EMPTY_MAX - m) stays 0,
# where -inf would give NaN for blocks that hold no valid column (padding-only shards).
EMPTY_MAX = -1.0e30


def empty_stats(num_tokens: int, device: torch.device) -> torch.Tensor:
    """Stats of a block without valid columns: ``[4, T]`` fp32."""
    stats_4T = torch.zeros(NUM_STATS, num_tokens, dtype=torch.float32, device=device)
    stats_4T[STAT_MAX] = EMPTY_MAX
    return stats_4T


def merge_stats(stats_N4T: torch.Tensor) -> torch.Tensor:
    """Merge N partial stats of disjoint column blocks into one ``[4, T]``."""
    if stats_N4T.shape[0] == 1:
        return stats_N4T[0]
    max_NT = stats_N4T[:, STAT_MAX]
    max_T = max_NT.amax(dim=0)
    scale_NT = torch.exp(max_NT - max_T)
    sumexp_NT = stats_N4T[:, STAT_SUMEXP]
    # sum exp(z - M) (z - M) = scale * (w_n + (m_n - M) * s_n)
    xlogx_NT = stats_N4T[:, STAT_XLOGX] + (max_NT - max_T) * sumexp_NT
    return torch.stack(
        [
            max_T,
            (sumexp_NT * scale_NT).sum(dim=0),
            (xlogx_NT * scale_NT).sum(dim=0),
            stats_N4T[:, STAT_TARGET].sum(dim=0),
        ]
    )


def all_gather_stats(stats_4T: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Gather every rank's ``[4, T]`` stats into ``[tp, 4, T]``: the one TP collective."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return stats_4T.unsqueeze(0)
    stats_4T = stats_4T.contiguous()
    parts = [torch.empty_like(stats_4T) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, stats_4T, group=tp_group)
    return torch.stack(parts)


@dataclass(frozen=True)
class TokenStats:
    """Per-token results of the forward, kept for the backward.

    Attributes:
        logprobs_T: log p(target) at the given temperature, 0 where the target is ignored.
        entropy_T: entropy of the tempered distribution, or None when not asked for.
        lse_T: log-sum-exp of the tempered logits over the whole (unpadded) vocabulary.
        valid_T: bool, the target lies in [0, vocab_size).
    """

    logprobs_T: torch.Tensor
    entropy_T: torch.Tensor | None
    lse_T: torch.Tensor
    valid_T: torch.Tensor


def finalize_stats(
    stats_4T: torch.Tensor, targets_T: torch.Tensor, *, vocab_size: int, compute_entropy: bool
) -> TokenStats:
    """Turn merged global stats into log-probabilities, entropy and log-sum-exp (fp32)."""
    log_sumexp_T = torch.log(stats_4T[STAT_SUMEXP])
    lse_T = stats_4T[STAT_MAX] + log_sumexp_T
    valid_T = (targets_T >= 0) & (targets_T < vocab_size)
    logprobs_T = torch.where(valid_T, stats_4T[STAT_TARGET] - lse_T, 0.0)
    entropy_T = None
    if compute_entropy:
        entropy_T = log_sumexp_T - stats_4T[STAT_XLOGX] / stats_4T[STAT_SUMEXP]
    return TokenStats(logprobs_T=logprobs_T, entropy_T=entropy_T, lse_T=lse_T, valid_T=valid_T)
