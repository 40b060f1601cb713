"""Sequence packing: several variable-length samples in one row, attending only to themselves.

A packed row is described by ``cu_seqlens`` (``[S + 1]`` cumulative lengths, starting at 0).
Position ids restart at 0 for every sample, and the attention mask is block-diagonal causal.
The mask follows Megatron's local attention convention: bool ``[1, 1, T, T]``, True = masked.
Padding at the end of a row (``T > cu_seqlens[-1]``) forms its own causal block, so no query
row is fully masked (a fully masked softmax row is NaN).

Legend: S samples in the row, T tokens in the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedRow:
    """One packed row.

    Attributes:
        tokens_T: the samples' tokens one after the other, then ``pad_id`` padding.
        position_ids_T: position within each sample (padding counts from 0 as well).
        cu_seqlens_S1: ``[S + 1]`` boundaries of the samples (padding excluded).
        seq_ids_T: sample index of each token; padding gets ``S`` (one past the last).
    """

    tokens_T: torch.Tensor
    position_ids_T: torch.Tensor
    cu_seqlens_S1: torch.Tensor
    seq_ids_T: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.cu_seqlens_S1[-1])


def cu_seqlens_from_lengths(lengths: Sequence[int]) -> torch.Tensor:
    """``[S]`` lengths -> ``[S + 1]`` int32 cumulative lengths starting at 0."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if lengths:
        out[1:] = torch.cumsum(torch.tensor(list(lengths), dtype=torch.int64), 0).to(torch.int32)
    return out


def _segment_bounds(cu_seqlens_S1: torch.Tensor, total_len: int) -> list[tuple[int, int]]:
    """(start, end) of every block, the trailing padding included as one more block."""
    cu = [int(x) for x in cu_seqlens_S1.tolist()]
    if cu[-1] > total_len:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} > row length {total_len}")
    bounds = [(a, b) for a, b in zip(cu[:-1], cu[1:], strict=True) if b > a]
    if cu[-1] < total_len:
        bounds.append((cu[-1], total_len))
    return bounds


def position_ids_from_cu_seqlens(cu_seqlens_S1: torch.Tensor, total_len: int) -> torch.Tensor:
    """``[T]`` positions restarting at 0 at each sample (and at the padding)."""
    pos_T = torch.arange(total_len, dtype=torch.long)
    for start, end in _segment_bounds(cu_seqlens_S1, total_len):
        pos_T[start:end] -= start
    return pos_T


def seq_ids_from_cu_seqlens(cu_seqlens_S1: torch.Tensor, total_len: int) -> torch.Tensor:
    """``[T]`` sample index of each token; padding tokens get ``S``."""
    lengths_S = (cu_seqlens_S1[1:] - cu_seqlens_S1[:-1]).long()
    ids_T = torch.repeat_interleave(torch.arange(lengths_S.numel()), lengths_S)
    pad = total_len - ids_T.numel()
    return torch.cat([ids_T, torch.full((pad,), lengths_S.numel(), dtype=torch.long)])


def block_causal_mask(cu_seqlens_S1: torch.Tensor, total_len: int) -> torch.Tensor:
    """Bool ``[1, 1, T, T]`` attention mask, True where query t must not see key k.

    Key k is visible from query t iff both lie in the same block and ``k <= t``.
    """
    seg_T = torch.empty(total_len, dtype=torch.long)
    for i, (start, end) in enumerate(_segment_bounds(cu_seqlens_S1, total_len)):
        seg_T[start:end] = i
    pos_T = torch.arange(total_len)
    visible_TT = (seg_T[:, None] == seg_T[None, :]) & (pos_T[None, :] <= pos_T[:, None])
    return (~visible_TT)[None, None]


def pack_sequences(
    seqs: Sequence[torch.Tensor], *, pad_id: int = 0, pad_to_multiple: int = 1
) -> PackedRow:
    """Concatenate 1-D token tensors into one row, padded to a multiple of ``pad_to_multiple``."""
    if not seqs:
        raise ValueError("nothing to pack")
    lengths = [int(s.numel()) for s in seqs]
    total = sum(lengths)
    padded = -(-total // pad_to_multiple) * pad_to_multiple
    tokens_T = torch.full((padded,), pad_id, dtype=seqs[0].dtype)
    tokens_T[:total] = torch.cat([s.reshape(-1) for s in seqs])
    cu = cu_seqlens_from_lengths(lengths)
    return PackedRow(
        tokens_T=tokens_T,
        position_ids_T=position_ids_from_cu_seqlens(cu, padded),
        cu_seqlens_S1=cu,
        seq_ids_T=seq_ids_from_cu_seqlens(cu, padded),
    )


def unpack(values_T: torch.Tensor, cu_seqlens_S1: torch.Tensor) -> list[torch.Tensor]:
    """Split a packed ``[T, ...]`` tensor back into its samples (padding dropped)."""
    cu = [int(x) for x in cu_seqlens_S1.tolist()]
    return [values_T[a:b] for a, b in zip(cu[:-1], cu[1:], strict=True)]
