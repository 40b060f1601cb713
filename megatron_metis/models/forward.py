"""Forward (and backward) passes of an engine model through Megatron's pipeline schedules.

A micro-batch is a pair ``(model_inputs, loss_inputs)``: ``model_inputs`` are the keyword
arguments of the model's ``forward`` (``input_ids``, ``position_ids``, ``attention_mask``, and for
vision-language models the image inputs); ``loss_inputs`` are whatever the loss function needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_metis.parallel import ParallelContext
from megatron_metis.parallel.context_parallel import gather_sequence, shard_sequence

Microbatch = tuple[Mapping[str, Any], Mapping[str, Any]]
LossFn = Callable[[torch.Tensor, Mapping[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
"""(vocab-parallel logits [B, S, V_pad/tp] of the last stage, loss inputs) -> (scalar loss,
metrics). The loss must already be normalised the way the caller wants the gradient."""


def text_position_ids(input_ids_BS: torch.Tensor) -> torch.Tensor:
    """Plain 0..S-1 positions for a batch of text-only sequences [B, S]."""
    b, s = input_ids_BS.shape
    return torch.arange(s, device=input_ids_BS.device).unsqueeze(0).expand(b, s)


def gather_vocab_logits(
    logits_BSv: torch.Tensor, ctx: ParallelContext, vocab_size: int
) -> torch.Tensor:
    """Vocab-parallel logits [B, S, V_pad/tp] -> full logits [B, S, V] without vocab padding.

    Not differentiable: for inspection and parity checks, never for a training loss.
    """
    if ctx.tp > 1:
        parts = [torch.empty_like(logits_BSv) for _ in range(ctx.tp)]
        dist.all_gather(parts, logits_BSv.contiguous(), group=ctx.tp_group)
        logits_BSv = torch.cat(parts, dim=-1)
    return gather_positions(logits_BSv[..., :vocab_size], ctx)


def gather_positions(t_BSx: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """A last-stage output ``[B, s, ...]`` of this CP rank's positions -> ``[B, S, ...]`` of the
    whole sequence (collective over the CP group; ``t_BSx`` itself without CP)."""
    if ctx.cp == 1:
        return t_BSx
    return gather_sequence(t_BSx, 1, ctx.cp_group)


def shard_microbatch(
    microbatch: Microbatch, ctx: ParallelContext, *, full_input_ids: bool
) -> Microbatch:
    """This CP rank's part of a micro-batch (``parallel.context_parallel`` has the layout).

    ``input_ids`` keep their CP positions (all of them for a model that embeds the whole
    sequence itself: ``full_input_ids``); ``position_ids`` stay whole, Megatron's RoPE computes
    every position and keeps this rank's; the attention mask keeps this rank's query rows
    against all keys ``[b, 1, s, S]``; every ``[b, S]`` loss input keeps this rank's positions.
    """
    model_inputs, loss_inputs = microbatch
    ids_BS = model_inputs["input_ids"]
    b, s = ids_BS.shape
    mask = model_inputs.get("attention_mask")
    if mask is None:  # Megatron's default: causal (True = masked)
        causal = torch.ones(s, s, dtype=torch.bool, device=ids_BS.device).triu(1)
        mask = causal.expand(b, 1, s, s)
    sharded = dict(model_inputs)
    sharded["attention_mask"] = shard_sequence(mask, 2, ctx.cp_group)
    if not full_input_ids:
        sharded["input_ids"] = shard_sequence(ids_BS, 1, ctx.cp_group)
    loss = {
        k: shard_sequence(v, 1, ctx.cp_group) if _per_position(v, b, s) else v
        for k, v in loss_inputs.items()
    }
    return sharded, loss


def _per_position(value: Any, b: int, s: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (b, s)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The engine model inside its DDP / Float16Module wrappers (``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _embeds_full_sequence(model: torch.nn.Module) -> bool:
    return bool(getattr(unwrap(model), "embeds_full_sequence", False))


def run_pipeline(
    model: torch.nn.Module,
    ctx: ParallelContext,
    microbatches: Sequence[Microbatch],
    loss_fn: LossFn,
    *,
    forward_only: bool,
) -> list[Any]:
    """Run all micro-batches through Megatron's schedule (any TP/PP); returns, on the last
    stage, what ``loss_fn`` returned per micro-batch (forward-only: its full return value; with
    backward: the metrics dicts), and ``[]`` on the other stages.

    With ``forward_only=False`` the gradients of the summed losses accumulate in ``param.grad``.
    Megatron's schedule divides each loss by the number of micro-batches (and multiplies it by
    the CP size); that scaling is undone here, so the gradient is exactly that of
    ``sum(loss_fn(...))``.

    Under context parallelism each CP rank runs its positions of every micro-batch
    (``shard_microbatch``): ``loss_fn`` sees this rank's logits ``[b, s, v]`` and loss inputs
    ``[b, s]``, returns its part of the loss (normalised by global counts), and outputs meant for
    the whole sequence go through ``gather_positions``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    scale = len(microbatches) / ctx.cp
    first_inputs = microbatches[0][0]
    if ctx.cp > 1:
        full_ids = _embeds_full_sequence(model)
        microbatches = [shard_microbatch(mb, ctx, full_input_ids=full_ids) for mb in microbatches]
    batches = iter(microbatches)

    def step(data_iterator, chunk):
        model_inputs, loss_inputs = next(data_iterator)
        model_inputs = {k: _to(v, ctx.device) for k, v in model_inputs.items()}
        output = chunk(**model_inputs)
        return output, lambda out, non_loss_data=False: _loss(out, loss_inputs, non_loss_data)

    def _loss(logits, loss_inputs, non_loss_data):
        if non_loss_data:
            return loss_fn(logits, loss_inputs)
        loss, metrics = loss_fn(logits, loss_inputs)
        return loss * scale, metrics

    context = torch.no_grad() if forward_only else torch.enable_grad()
    with context:
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=batches,
            model=[model],
            num_microbatches=len(microbatches),
            seq_length=first_inputs["input_ids"].shape[1],
            micro_batch_size=first_inputs["input_ids"].shape[0],
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )
    return list(outputs) if ctx.is_last_stage else []


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


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
    position_ids = text_position_ids(input_ids_BS) if position_ids is None else position_ids
    ids = input_ids_BS.chunk(num_microbatches)
    pos = position_ids.chunk(num_microbatches, dim=-2)
    masks = (
        [None] * num_microbatches
        if attention_mask is None
        else attention_mask.chunk(num_microbatches)
    )
    microbatches = [
        ({"input_ids": i, "position_ids": p, "attention_mask": m}, {})
        for i, p, m in zip(ids, pos, masks, strict=True)
    ]
    return _logits_of(model, ctx, microbatches, vocab_size)


def forward_vl_logits(
    model: torch.nn.Module,
    ctx: ParallelContext,
    input_ids_BS: torch.Tensor,
    *,
    vocab_size: int,
    attention_mask_BS: torch.Tensor | None = None,
    pixel_values_PC: torch.Tensor | None = None,
    image_grid_thw_N3: torch.Tensor | None = None,
    num_microbatches: int = 1,
) -> torch.Tensor | None:
    """``forward_logits`` of a Qwen2.5-VL engine model for a (mixed-modal) HF-style batch.

    Args:
        attention_mask_BS: 1 for tokens, 0 for padding (left or right); None: no padding.
        pixel_values_PC / image_grid_thw_N3: the images of the whole batch in sample order
            (None when no sample has an image), as the HF processor returns them.

    Returns:
        Full-vocabulary logits [B, S, V] on the last stage, None elsewhere.
    """
    from megatron_metis.models.qwen2_5_vl import vl_model_inputs

    inputs = vl_model_inputs(
        model,
        input_ids_BS,
        attention_mask_BS=attention_mask_BS,
        pixel_values_PC=pixel_values_PC,
        image_grid_thw_N3=image_grid_thw_N3,
        num_microbatches=num_microbatches,
    )
    return _logits_of(model, ctx, [(m, {}) for m in inputs], vocab_size)


def _logits_of(
    model: torch.nn.Module, ctx: ParallelContext, microbatches: list[Microbatch], vocab_size: int
) -> torch.Tensor | None:
    outputs = run_pipeline(
        model,
        ctx,
        microbatches,
        lambda logits, _: gather_vocab_logits(logits, ctx, vocab_size),
        forward_only=True,
    )
    return torch.cat(outputs, dim=0) if ctx.is_last_stage else None
