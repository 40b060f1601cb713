"""Per-rank bodies of the Qwen2.5-VL engine tests (module level, so ``spawn`` can pickle them)."""

from __future__ import annotations

import torch

from megatron_metis.checkpoint import export_hf_weights, load_hf_weights
from megatron_metis.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_metis.config import ModelConfig, ParallelConfig
from megatron_metis.data.vl_inputs import VLBatch
from megatron_metis.models import build_model, read_hf_config
from megatron_metis.models.forward import forward_vl_logits, run_pipeline
from megatron_metis.models.qwen2_5_vl import vl_model_inputs
from megatron_metis.parallel import init_parallel

FREEZE = {
    "trainable": {},
    "frozen_tower": {"freeze_vision_tower": True},
    "frozen_all": {"freeze_vision_tower": True, "freeze_merger": True},
}


def _batch_kwargs(batch: VLBatch) -> dict:
    return {
        "attention_mask_BS": batch.attention_mask_BS,
        "pixel_values_PC": batch.pixel_values_PC,
        "image_grid_thw_N3": batch.image_grid_thw_N3,
    }


def loss_weights(batch: VLBatch, vocab_size: int, padded: int) -> torch.Tensor:
    """Fixed weights W [B, S, V_pad] for the loss sum(logits * W); zero on padding."""
    b, s = batch.input_ids_BS.shape
    w = torch.randn(b, s, vocab_size, generator=torch.Generator().manual_seed(2))
    w = w * batch.attention_mask_BS[..., None]
    return torch.nn.functional.pad(w, (0, padded - vocab_size))


def _grads(model, ctx, arch, batch: VLBatch) -> dict[str, torch.Tensor]:
    """HF-named gradients of sum(logits * W) over 2 micro-batches through the schedule."""
    w = loss_weights(batch, arch.vocab_size, model.vocab_size)
    per_rank = model.vocab_size // ctx.tp
    w_local = w[..., ctx.tp_rank * per_rank : (ctx.tp_rank + 1) * per_rank]
    inputs = vl_model_inputs(model, batch.input_ids_BS, num_microbatches=2, **_batch_kwargs(batch))
    microbatches = [(m, {"w": wl}) for m, wl in zip(inputs, w_local.chunk(2), strict=True)]
    model.zero_grad(set_to_none=True)
    run_pipeline(
        model,
        ctx,
        microbatches,
        lambda logits, extra: ((logits * extra["w"]).sum(), {}),
        forward_only=False,
    )
    return {
        k: v.clone()
        for k, v in export_hf_weights(model, ctx, arch, tensor_of=lambda p: _grad_or_none(p))
    }


def _grad_or_none(param: torch.Tensor) -> torch.Tensor:
    # A frozen parameter is exported as NaN so the test sees that it has no gradient.
    if param.grad is None:
        return torch.full_like(param, float("nan"))
    return param.grad


def layout_worker(
    hf_dir: str, tp: int, pp: int, batches: dict[str, VLBatch], convert: dict[str, str]
) -> dict:
    """At one TP x PP layout: logits of each batch, the exported weights, gradients (PP=1) with
    the tower trainable / frozen, and the dist-checkpoint conversions named in ``convert``."""
    torch.set_num_threads(1)
    ctx = init_parallel(ParallelConfig(tp=tp, pp=pp, timeout_s=120))
    hf_config = read_hf_config(hf_dir)
    cfg = ModelConfig(dtype="float32", make_vocab_size_divisible_by=1)
    model, arch = build_model(hf_config, ctx, cfg)
    load_hf_weights(model, ctx, arch, hf_dir)
    out: dict = {"logits": {}, "grads": {}, "requires_grad": {}}
    for name, batch in batches.items():
        out["logits"][name] = forward_vl_logits(
            model,
            ctx,
            batch.input_ids_BS,
            vocab_size=arch.vocab_size,
            num_microbatches=2,
            **_batch_kwargs(batch),
        )
    exported = {k: v.clone() for k, v in export_hf_weights(model, ctx, arch)}
    out["exported"] = exported if ctx.rank == 0 else None
    if pp == 1:
        for tag, flags in FREEZE.items():
            frozen, _ = build_model(hf_config, ctx, ModelConfig(**vars(cfg) | flags))
            load_hf_weights(frozen, ctx, arch, hf_dir)
            out["requires_grad"][tag] = {
                n: p.requires_grad for n, p in frozen.vision.named_parameters()
            }
            out["grads"][tag] = _grads(frozen, ctx, arch, batches["mixed"])
    if "alt_hf_dir" in convert:
        other, _ = build_model(hf_config, ctx, cfg)
        load_hf_weights(other, ctx, arch, convert["alt_hf_dir"])
        alt = {k: v.clone() for k, v in export_hf_weights(other, ctx, arch)}
        out["alt_exported"] = alt if ctx.rank == 0 else None
    conv_cfg = ModelConfig(dtype="float32")
    if "save_dist" in convert:
        hf_to_megatron(hf_dir, convert["save_dist"], ctx, conv_cfg)
    if "load_dist" in convert:
        megatron_to_hf(convert["load_dist"], convert["hf_out"], ctx, conv_cfg)
    ctx.destroy()
    return out
