"""SFT: next-token NLL on assistant tokens only, normalised over the whole batch.

The loss mask comes from the chat-templated token ids (Qwen2.5 / ChatML layout):
``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n``. Only the CONTENT tokens of assistant turns and
their closing ``<|im_end|>`` (the model must learn to stop) are targets; system and user turns
(image pads included), the role headers and the newline after ``<|im_end|>`` are masked.

Shift convention: position t predicts token t + 1, so ``labels_T[t] = input_ids_T[t + 1]`` and
``loss_mask_T[t] = target_mask_T[t + 1]``, never across the boundary of two packed samples.

Legend: T tokens (one row, possibly several packed samples), S samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from megatron_metis.algorithms.aggregation import aggregate

IGNORE_INDEX = -100


class _Tokenizer(Protocol):
    def convert_tokens_to_ids(self, token: str) -> int: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class ChatTokenIds:
    """The token ids the mask needs; ``from_tokenizer`` reads them from a Qwen tokenizer."""

    im_start_id: int
    im_end_id: int
    assistant_role_ids: tuple[int, ...]
    newline_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: _Tokenizer) -> ChatTokenIds:
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if len(newline) != 1:
            raise ValueError(f"'\\n' must be one token, got {newline}")
        return cls(
            im_start_id=int(tokenizer.convert_tokens_to_ids("<|im_start|>")),
            im_end_id=int(tokenizer.convert_tokens_to_ids("<|im_end|>")),
            assistant_role_ids=tuple(tokenizer.encode("assistant", add_special_tokens=False)),
            newline_id=int(newline[0]),
        )


def _segment_target_mask(ids: list[int], chat: ChatTokenIds) -> list[bool]:
    """Target mask of one conversation (a python list walk: samples are short lists)."""
    mask = [False] * len(ids)
    role = list(chat.assistant_role_ids)
    t = 0
    while t < len(ids):
        if ids[t] != chat.im_start_id:
            t += 1
            continue
        is_assistant = ids[t + 1 : t + 1 + len(role)] == role
        t += 1 + (len(role) if is_assistant else 0)
        if is_assistant and t < len(ids) and ids[t] == chat.newline_id:
            t += 1  # the header's newline; a merged "\n\n" token stays (it is content)
        while t < len(ids) and ids[t] != chat.im_start_id:
            mask[t] = is_assistant
            if ids[t] == chat.im_end_id:
                t += 1
                break
            t += 1
    return mask


def assistant_target_mask(
    input_ids_T: torch.Tensor, chat: ChatTokenIds, *, cu_seqlens_S1: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool ``[T]``: True at the tokens an SFT model is trained to produce.

    Args:
        input_ids_T: one row of chat-templated token ids (several packed samples allowed).
        chat: the special token ids.
        cu_seqlens_S1: sample boundaries of a packed row (None: one sample); tokens past the
            last boundary (padding) are never targets.

    A conversation cut short inside an assistant turn (no ``<|im_end|>``) is a target up to
    the end of its sample.
    """
    ids = input_ids_T.tolist()
    bounds = [0, len(ids)] if cu_seqlens_S1 is None else [int(x) for x in cu_seqlens_S1]
    mask = [False] * len(ids)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        mask[start:end] = _segment_target_mask(ids[start:end], chat)
    return torch.tensor(mask, dtype=torch.bool, device=input_ids_T.device)


def next_token_targets(
    input_ids_T: torch.Tensor,
    target_mask_T: torch.Tensor,
    *,
    cu_seqlens_S1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels_T, loss_mask_T)``: the token each position predicts and whether it counts.

    The last position of every sample (and padding) gets ``IGNORE_INDEX`` and mask False.
    """
    total = input_ids_T.numel()
    labels_T = torch.full_like(input_ids_T, IGNORE_INDEX)
    loss_mask_T = torch.zeros(total, dtype=torch.bool, device=input_ids_T.device)
    bounds = [0, total] if cu_seqlens_S1 is None else [int(x) for x in cu_seqlens_S1]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end - start < 2:
            continue
        labels_T[start : end - 1] = input_ids_T[start + 1 : end]
        loss_mask_T[start : end - 1] = target_mask_T[start + 1 : end]
    return labels_T, loss_mask_T


def sft_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    loss_norm: Literal["token", "sequence"] = "token",
    num_global_tokens: float | None = None,
    num_global_seqs: float | None = None,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked NLL of the target tokens: ``-sum(logprobs * mask) / num_global_tokens``.

    Args:
        logprobs: log p(label) per position (0 where masked is fine), ``[T]`` or ``[S, T]``.
        loss_mask: the positions that count.
        loss_norm: ``token`` (global token mean) or ``sequence`` (mean of per-sample means,
            divided by ``num_global_seqs``; needs ``seq_ids`` for a packed ``[T]`` row).
        num_global_tokens / num_global_seqs: counts over all micro-batches and DP ranks
            (``local_loss_normalisers``, summed).

    Returns:
        ``(loss, metrics)``: the micro-batch's partial loss; ``nll_sum`` and ``num_tokens``
        (local, detached: ``sum(nll_sum) / sum(num_tokens)`` is the batch's token NLL).
    """
    agg = "token_mean" if loss_norm == "token" else "seq_mean"
    loss = aggregate(
        -logprobs.float(),
        loss_mask,
        loss_agg=agg,
        num_global_tokens=num_global_tokens,
        num_global_seqs=num_global_seqs,
        seq_ids=seq_ids,
    )
    with torch.no_grad():
        valid = loss_mask.bool()
        metrics = {
            "nll_sum": -(logprobs.detach().float() * valid).sum(),
            "num_tokens": valid.sum().float(),
        }
    return loss, metrics
