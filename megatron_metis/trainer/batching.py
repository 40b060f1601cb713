"""Samples -> packed rows -> micro-batches in the form ``models.forward.run_pipeline`` takes.

A ``Sample`` is one conversation or one prompt + response: its tokens, which tokens are
targets, optional per-token values (advantages, old log-probs...) and its images. Rows hold one
sample (padding) or several (packing: a block-diagonal causal mask keeps samples apart, and
position ids restart per sample; for Qwen2.5-VL the M-RoPE ids are computed per sample, so
packing works for image and text samples alike). Every row of a step is padded to the same
length (pipeline stages exchange activations of one fixed shape), and ``micro_batch_size`` rows
form a micro-batch.

Shift convention (``algorithms.sft.next_token_targets``): position t predicts token t + 1;
``loss_mask[t]`` is the target flag of token t + 1 and per-token values are shifted alike, so
``values[name][t]`` belongs to the token predicted at t.

Legend: L tokens of a sample, S row length, b rows of a micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megatron_metis.algorithms.aggregation import local_loss_normalisers
from megatron_metis.algorithms.packing import (
    block_causal_mask,
    cu_seqlens_from_lengths,
    position_ids_from_cu_seqlens,
)
from megatron_metis.algorithms.sft import IGNORE_INDEX
from megatron_metis.models.forward import Microbatch
from megatron_metis.parallel import ParallelContext, global_count

PositionFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""(token ids [1, L], image grids [n, 3] or None) -> position ids [3, 1, L] (Qwen2.5-VL)."""


@dataclass
class Sample:
    """One training sequence.

    Attributes:
        token_ids_L: the tokens.
        target_mask_L: True at tokens the model is trained to produce.
        values: per-token float tensors ``[L]`` aligned with the tokens (the value of token t).
        pixel_values_PC / image_grid_thw_N3: the sample's images (Qwen2.5-VL), or None.
        index: the sample's number in its batch (metrics, sequence-mean grouping).
    """

    token_ids_L: torch.Tensor
    target_mask_L: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    pixel_values_PC: torch.Tensor | None = None
    image_grid_thw_N3: torch.Tensor | None = None
    index: int = 0

    def __len__(self) -> int:
        return int(self.token_ids_L.numel())

    @property
    def num_targets(self) -> int:
        """Target tokens that some position predicts (token 0 is never predicted)."""
        return int(self.target_mask_L[1:].sum())


def empty_sample() -> Sample:
    """Two tokens, no target: the one sample of a replica that has nothing to train on in a
    step (it still runs the step, whose collectives need every rank)."""
    ids = torch.zeros(2, dtype=torch.long)
    return Sample(token_ids_L=ids, target_mask_L=torch.zeros(2, dtype=torch.bool))


def global_loss_normalisers(ctx: ParallelContext, samples: Sequence[Sample]) -> dict[str, float]:
    """``tokens`` and ``seqs``: the target tokens and the sequences with a target of a batch,
    summed over the data-parallel ranks (``num_global_tokens`` / ``num_global_seqs`` of the
    losses)."""
    tokens = sum(local_loss_normalisers(s.target_mask_L[1:])[0] for s in samples)
    seqs = sum(1 for s in samples if s.num_targets)
    return {"tokens": global_count(ctx, tokens), "seqs": global_count(ctx, seqs)}


def pack_rows(samples: Sequence[Sample], *, max_tokens: int, pack: bool) -> list[list[Sample]]:
    """Group samples into rows, in order: next-fit up to ``max_tokens`` (or one per row)."""
    rows: list[list[Sample]] = []
    used = 0
    for sample in samples:
        if len(sample) > max_tokens:
            raise ValueError(f"a sample of {len(sample)} tokens exceeds the row of {max_tokens}")
        if pack and rows and used + len(sample) <= max_tokens:
            rows[-1].append(sample)
            used += len(sample)
        else:
            rows.append([sample])
            used = len(sample)
    return rows


def _shifted(value_L: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(value_L)
    out[:-1] = value_L[1:]
    return out


def _row_tensors(
    row: Sequence[Sample], length: int, pad_id: int, position_fn: PositionFn | None
) -> dict[str, torch.Tensor]:
    """Tokens, positions, mask, labels, loss mask, values and sample ids of one padded row."""
    cu = cu_seqlens_from_lengths([len(s) for s in row])
    ids_S = torch.full((length,), pad_id, dtype=torch.long)
    labels_S = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    loss_mask_S = torch.zeros(length, dtype=torch.bool)
    seq_ids_S = torch.full((length,), row[-1].index, dtype=torch.long)
    names = sorted({k for s in row for k in s.values})
    values = {k: torch.zeros(length, dtype=torch.float32) for k in names}
    if position_fn is None:
        pos = position_ids_from_cu_seqlens(cu, length)
    else:
        pos = torch.arange(length).repeat(3, 1)  # padding: its own block, plain positions
    for s, (a, b) in zip(row, zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True), strict=True):
        ids_S[a:b] = s.token_ids_L
        labels_S[a : b - 1] = s.token_ids_L[1:]
        loss_mask_S[a:b] = _shifted(s.target_mask_L.bool().to(torch.uint8)).bool()
        seq_ids_S[a:b] = s.index
        for k in names:
            if k in s.values:
                values[k][a:b] = _shifted(s.values[k].float())
        if position_fn is not None:
            pos[:, a:b] = position_fn(s.token_ids_L[None], s.image_grid_thw_N3)[:, 0]
    return {
        "input_ids": ids_S,
        "position_ids": pos,
        "attention_mask": block_causal_mask(cu, length)[0],
        "labels": labels_S,
        "loss_mask": loss_mask_S,
        "seq_ids": seq_ids_S,
        **{f"value:{k}": v for k, v in values.items()},
    }


def _images(samples: Sequence[Sample]) -> dict[str, torch.Tensor | None]:
    pixels = [s.pixel_values_PC for s in samples if s.pixel_values_PC is not None]
    grids = [s.image_grid_thw_N3 for s in samples if s.image_grid_thw_N3 is not None]
    return {
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_grid_thw": torch.cat(grids) if grids else None,
    }


def build_microbatches(
    rows: Sequence[Sequence[Sample]],
    *,
    micro_batch_size: int,
    pad_id: int,
    position_fn: PositionFn | None,
    pad_to_multiple: int = 8,
) -> list[Microbatch]:
    """Rows -> micro-batches ``(model_inputs, loss_inputs)``, all of one shape ``[b, S]``.

    ``position_fn`` is the model's M-RoPE position function for Qwen2.5-VL (then the image
    inputs are included), None for a text model (1-D positions restarting per sample). A last
    micro-batch with fewer rows is filled with empty padding rows (no targets).

    ``loss_inputs``: ``labels``, ``loss_mask``, ``seq_ids`` ``[b, S]`` and one ``[b, S]``
    tensor per sample value (key ``value:<name>``).
    """
    longest = max(sum(len(s) for s in row) for row in rows)
    length = -(-longest // pad_to_multiple) * pad_to_multiple
    tensors = [_row_tensors(row, length, pad_id, position_fn) for row in rows]
    filler = dict(tensors[0])
    filler.update(
        input_ids=torch.full_like(filler["input_ids"], pad_id),
        labels=torch.full_like(filler["labels"], IGNORE_INDEX),
        loss_mask=torch.zeros_like(filler["loss_mask"]),
        attention_mask=block_causal_mask(cu_seqlens_from_lengths([]), length)[0],
    )
    out: list[Microbatch] = []
    for start in range(0, len(rows), micro_batch_size):
        group = tensors[start : start + micro_batch_size]
        group_rows = rows[start : start + micro_batch_size]
        group = group + [filler] * (micro_batch_size - len(group))
        stacked = {k: torch.stack([t[k] for t in group]) for k in group[0]}
        model_inputs: dict[str, torch.Tensor | None] = {
            "input_ids": stacked["input_ids"],
            "position_ids": stacked["position_ids"].transpose(0, 1)
            if position_fn is not None
            else stacked["position_ids"],
            "attention_mask": stacked["attention_mask"],
        }
        if position_fn is not None:
            model_inputs.update(_images([s for row in group_rows for s in row]))
        loss_inputs = {k: v for k, v in stacked.items() if k not in model_inputs}
        out.append((model_inputs, loss_inputs))
    return out
