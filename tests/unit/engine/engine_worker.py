"""Per-rank bodies of the engine tests (module level, so ``spawn`` can pickle them)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_metis.checkpoint import (
    export_hf_weights,
    load_hf_weights,
    load_model_checkpoint,
    save_model_checkpoint,
)
from megatron_metis.config import ModelConfig, ParallelConfig
from megatron_metis.models import build_model, forward_logits, read_hf_config
from megatron_metis.models.forward import run_pipeline
from megatron_metis.parallel import init_parallel

SEQ = 12
BATCH = 4


def batch_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def logit_weights(vocab_size: int, padded: int) -> torch.Tensor:
    """Fixed random weights W [B, S, V_pad] (zero on padding) for the loss sum(logits * W)."""
    w = torch.randn(BATCH, SEQ, vocab_size, generator=torch.Generator().manual_seed(2))
    return torch.nn.functional.pad(w, (0, padded - vocab_size))


def _grads(model, ctx, arch, ids, divisible_by: int):
    """Gradient (under HF names) of sum(logits * W) over 2 micro-batches through the schedule."""
    w = logit_weights(arch.vocab_size, arch.padded_vocab_size(ctx.tp, divisible_by))
    per_rank = w.shape[-1] // ctx.tp
    w_local = w[..., ctx.tp_rank * per_rank : (ctx.tp_rank + 1) * per_rank]
    microbatches = [
        (
            {
                "input_ids": i,
                "position_ids": torch.arange(SEQ).expand_as(i),
                "attention_mask": None,
            },
            {"w": wl},
        )
        for i, wl in zip(ids.chunk(2), w_local.chunk(2), strict=True)
    ]
    model.zero_grad(set_to_none=True)
    run_pipeline(
        model,
        ctx,
        microbatches,
        lambda logits, inputs: ((logits * inputs["w"]).sum(), {}),
        forward_only=False,
    )
    if ctx.cp > 1:  # each CP rank holds the gradient of its positions: sum them, as DDP does
        for p in model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, group=ctx.cp_group)
    zero = torch.zeros(())
    return {
        k: v.clone()
        for k, v in export_hf_weights(
            model,
            ctx,
            arch,
            tensor_of=lambda p: p.grad if p.grad is not None else torch.zeros_like(p),
        )
    } | {"_": zero}


def layout_worker(
    hf_dirs: dict[str, str],
    tp: int,
    pp: int,
    save_to: str | None,
    load_from: str | None,
    cp: int = 1,
) -> dict:
    """At one TP x PP x CP layout, for each tiny HF model: logits, HF-named gradients, the
    exported weights; optionally save a dist checkpoint and reload one saved at another layout."""
    torch.set_num_threads(1)
    ctx = init_parallel(ParallelConfig(tp=tp, pp=pp, cp=cp, timeout_s=120))
    out: dict = {}
    for tag, hf_dir in hf_dirs.items():
        # make_vocab_size_divisible_by=1 exercises padding by TP alone (131 -> 132 at TP=2).
        divisible_by = 128 if save_to or load_from else 1
        cfg = ModelConfig(dtype="float32", make_vocab_size_divisible_by=divisible_by)
        model, arch = build_model(read_hf_config(hf_dir), ctx, cfg)
        load_hf_weights(model, ctx, arch, hf_dir)
        ids = batch_ids(arch.vocab_size)
        result = {
            "logits": forward_logits(
                model, ctx, ids, vocab_size=arch.vocab_size, num_microbatches=2
            ),
            "exported": {k: v.clone() for k, v in export_hf_weights(model, ctx, arch)},
            "grads": _grads(model, ctx, arch, ids, divisible_by),
        }
        if save_to:
            save_model_checkpoint(model, ctx, Path(save_to) / tag, arch=arch, hf_dir=hf_dir)
        if load_from:
            fresh, _ = build_model(read_hf_config(hf_dir), ctx, cfg)
            load_model_checkpoint(fresh, ctx, Path(load_from) / tag, arch=arch)
            result["reloaded_logits"] = forward_logits(
                fresh, ctx, ids, vocab_size=arch.vocab_size, num_microbatches=2
            )
        out[tag] = result
    ctx.destroy()
    return out
