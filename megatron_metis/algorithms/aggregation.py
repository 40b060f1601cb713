"""Loss aggregation with global normalisers: a micro-batch's loss is a partial sum.

``loss_agg``: ``token_mean`` divides the sum over valid tokens by ``num_global_tokens``, the
valid-token count of the whole batch (all micro-batches, all data-parallel ranks);
``seq_mean`` averages each sequence over its valid tokens and divides the sum of those means by
``num_global_seqs``. Summing the micro-batch losses gives the batch loss exactly, whatever the
split. The caller counts the normalisers with ``local_loss_normalisers`` and all-reduces them.

Per-token tensors are flat ``[T]`` (packed; ``seq_ids`` names each token's sequence) or padded
``[S, T]`` (one row per sequence).

Legend: S sequences, T tokens.
"""

from __future__ import annotations

from typing import Literal

import torch

LossAgg = Literal["token_mean", "seq_mean"]


def _seq_ids(mask: torch.Tensor, seq_ids: torch.Tensor | None) -> torch.Tensor:
    """Sequence index of each token: given, or the row index of a padded ``[S, T]`` tensor."""
    if seq_ids is not None:
        return seq_ids.long().expand_as(mask)
    if mask.dim() != 2:
        raise ValueError("seq_mean on flat [T] tokens needs seq_ids")
    rows_S1 = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1)
    return rows_S1.expand_as(mask)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_agg: LossAgg,
    num_global_tokens: float | None = None,
    num_global_seqs: float | None = None,
    seq_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """This micro-batch's share of a batch-level mean of ``per_token`` over valid tokens.

    token_mean: ``sum(per_token * mask) / num_global_tokens``. seq_mean: for each sequence,
    the mean over its valid tokens, summed and divided by ``num_global_seqs``; a sequence with
    no valid token contributes 0.
    """
    mask = mask.to(per_token.dtype)
    if loss_agg == "token_mean":
        if num_global_tokens is None:
            raise ValueError("loss_agg='token_mean' needs num_global_tokens")
        return (per_token * mask).sum() / max(float(num_global_tokens), 1.0)
    if loss_agg != "seq_mean":
        raise ValueError(f"loss_agg must be 'token_mean' or 'seq_mean', got {loss_agg!r}")
    if num_global_seqs is None:
        raise ValueError("loss_agg='seq_mean' needs num_global_seqs")
    ids = _seq_ids(mask, seq_ids).flatten()
    num_seqs = int(ids.max()) + 1 if ids.numel() else 0
    sums_S = torch.zeros(num_seqs, dtype=per_token.dtype, device=per_token.device)
    sums_S = sums_S.index_add(0, ids, (per_token * mask).flatten())
    counts_S = torch.bincount(ids, weights=mask.flatten().float(), minlength=num_seqs)
    per_seq_S = sums_S / counts_S.to(per_token.dtype).clamp(min=1.0)
    return per_seq_S.sum() / max(float(num_global_seqs), 1.0)


def local_loss_normalisers(
    mask: torch.Tensor, seq_ids: torch.Tensor | None = None
) -> tuple[int, int]:
    """``(valid tokens, sequences with a valid token)`` of one micro-batch.

    Sum these over the micro-batches and data-parallel ranks of the batch (an all-reduce)
    to get ``num_global_tokens`` and ``num_global_seqs``. A flat ``[T]`` mask without
    ``seq_ids`` is one sequence.
    """
    mask = mask.bool()
    if seq_ids is None:
        rows = mask if mask.dim() == 2 else mask.reshape(1, -1)
        return int(mask.sum()), int(rows.any(dim=1).sum())
    ids = _seq_ids(mask, seq_ids)
    return int(mask.sum()), int(torch.unique(ids[mask]).numel())
