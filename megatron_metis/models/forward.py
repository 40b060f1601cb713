"""Forward passes of the engine's language model through Megatron's pipeline schedules."""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from megatron_metis.parallel import ParallelContext


def text_position_ids(input_ids_BS: torch.Tensor) -> torch.Tensor:
    """Plain 0..S-1 positions for a batch of text-only sequences [B, S]."""
    b, s = input_ids_BS.shape
    return torch.arange(s, device=input_ids_BS.device).unsqueeze(0).expand(b, s)


def gather_vocab_logits(
    logits_BSv: torch.Tensor, ctx: ParallelContext, vocab_size: int
) -> torch.Tensor:
    """Vocab-parallel logits [B, S, V_pad/tp] -> full logits [B, S, V] without vocab padding."""
    if ctx.tp > 1:
        parts = [torch.empty_like(logits_BSv) for _ in range(ctx.tp)]
        dist.all_gather(parts, logits_BSv.contiguous(), group=ctx.tp_group)
        logits_BSv = torch.cat(parts, dim=-1)
    return logits_BSv[..., :vocab_size]


def forward_logits(
    model: torch.nn.Module,
    ctx: ParallelContext,
    input_ids_BS: torch.Tensor,
    *,
    vocab_size: int,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    num_microbatches: int = 1,
) -> torch.Tensor | None:
    """Full-vocabulary logits [B, S, V] on the last pipeline stage (None on the other stages).

    Runs Megatron's forward-only schedule, so it works at any TP/PP; the batch is split into
    ``num_microbatches`` along B.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids = text_position_ids(input_ids_BS) if position_ids is None else position_ids
    ids = input_ids_BS.to(ctx.device).chunk(num_microbatches)
    pos = position_ids.to(ctx.device).chunk(num_microbatches, dim=-2)
    masks = [None] * num_microbatches if attention_mask is None else attention_mask.chunk(
        num_microbatches
    )
    batches = iter(zip(ids, pos, masks))

    def step(data_iterator, chunk):
        input_ids, positions, mask = next(data_iterator)
        output = chunk(input_ids, positions, mask)
        return output, partial(_keep_logits, ctx=ctx, vocab_size=vocab_size)

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=batches,
            model=[model],
            num_microbatches=num_microbatches,
            seq_length=input_ids_BS.shape[1],
            micro_batch_size=ids[0].shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not ctx.is_last_stage:
        return None
    return torch.cat(list(outputs), dim=0)


def _keep_logits(logits_BSv, *, ctx: ParallelContext, vocab_size: int, non_loss_data: bool = True):
    return gather_vocab_logits(logits_BSv, ctx, vocab_size)
