"""Check a HF checkpoint on the engine before a long job: same batches through transformers and
through the engine at a TP/PP layout, max abs logit difference.

The batches are synthetic (random text ids, random patches) so that no tokenizer or image files
are needed: for Qwen2.5-VL an image+text batch (one image, two images, text-only and one image
sample, right-padded) and a text-only batch; for Qwen2 the text-only batch.

Shape legend: ``B`` batch, ``S`` sequence, ``P`` patches, ``C`` values per patch, ``N`` images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_metis.checkpoint.hf_convert import load_hf_weights
from megatron_metis.config import ModelConfig, ParallelConfig
from megatron_metis.models.factory import build_model, read_hf_config

Batch = dict[str, torch.Tensor | None]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GRIDS = ([(1, 4, 6)], [(1, 6, 4), (1, 4, 4)], [], [(1, 2, 8)])


def _text_id_bound(hf_config: dict) -> int:
    """Random text ids stay below every special vision token (and inside the vocab)."""
    text = hf_config.get("text_config") or hf_config
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    specials = [hf_config[k] for k in keys if hf_config.get(k) is not None]
    return min([int(text["vocab_size"]), *specials])


def _sample(hf_config: dict, grids: list, g: torch.Generator) -> tuple[list[int], list]:
    bound = _text_id_bound(hf_config)
    merge = (hf_config.get("vision_config") or {}).get("spatial_merge_size", 2)
    ids = torch.randint(0, bound, (5,), generator=g).tolist()
    for t, h, w in grids:
        pads = [hf_config["image_token_id"]] * (t * h * w // merge**2)
        ids += [hf_config["vision_start_token_id"], *pads, hf_config["vision_end_token_id"]]
        ids += torch.randint(0, bound, (3,), generator=g).tolist()
    return ids, grids


def _pad_right(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    s = max(len(r) for r in rows)
    ids_BS = torch.zeros(len(rows), s, dtype=torch.long)
    mask_BS = torch.zeros(len(rows), s, dtype=torch.long)
    for i, row in enumerate(rows):
        ids_BS[i, : len(row)] = torch.tensor(row)
        mask_BS[i, : len(row)] = 1
    return ids_BS, mask_BS


def synthetic_batches(hf_config: dict, *, seed: int = 0) -> dict[str, Batch]:
    """``image_text`` (Qwen2.5-VL only) and ``text`` batches with HF-style keys."""
    g = torch.Generator().manual_seed(seed)
    layouts = {"text": [[], []]}
    if hf_config.get("model_type") == "qwen2_5_vl":
        layouts = {"image_text": list(_GRIDS), **layouts}
    batches = {}
    for name, grids_per_sample in layouts.items():
        rows, grids = [], []
        for sample_grids in grids_per_sample:
            ids, used = _sample(hf_config, sample_grids, g)
            rows.append(ids)
            grids += used
        ids_BS, mask_BS = _pad_right(rows)
        batches[name] = {
            "input_ids": ids_BS,
            "attention_mask": mask_BS,
            **_pixels(hf_config, grids, g),
        }
    return batches


def _pixels(hf_config: dict, grids: list, g: torch.Generator) -> Batch:
    if not grids:
        return {"pixel_values": None, "image_grid_thw": None}
    vision = hf_config.get("vision_config") or {}
    c = 3 * vision.get("temporal_patch_size", 2) * vision.get("patch_size", 14) ** 2
    n_patches = sum(t * h * w for t, h, w in grids)
    return {
        "pixel_values": torch.randn(n_patches, c, generator=g),
        "image_grid_thw": torch.tensor(grids, dtype=torch.long),
    }


def hf_reference_logits(hf_dir: str | Path, batches: dict[str, Batch], dtype: str) -> dict:
    """Logits [B, S, V] of transformers' own model for each batch (on the CPU)."""
    import transformers

    hf_config = read_hf_config(hf_dir)
    cls_name = {
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen2": "Qwen2ForCausalLM",
    }[hf_config["model_type"]]
    model = getattr(transformers, cls_name).from_pretrained(hf_dir, dtype=_DTYPES[dtype]).eval()
    image_token = hf_config.get("image_token_id")
    out = {}
    with torch.no_grad():
        for name, batch in batches.items():
            kwargs = {k: v for k, v in batch.items() if v is not None}
            if image_token is not None:
                kwargs["mm_token_type_ids"] = (batch["input_ids"] == image_token).int()
            out[name] = model(**kwargs).logits.float()
    return out


def engine_logits_worker(
    hf_dir: str, tp: int, pp: int, batches: dict[str, Batch], dtype: str
) -> dict | None:
    """Per rank: load ``hf_dir`` at TP x PP and return the logits (last stage, TP rank 0)."""
    from megatron_metis.models.forward import forward_logits, forward_vl_logits
    from megatron_metis.parallel import init_parallel

    ctx = init_parallel(ParallelConfig(tp=tp, pp=pp))
    model, arch = build_model(read_hf_config(hf_dir), ctx, ModelConfig(dtype=dtype), source=hf_dir)
    load_hf_weights(model, ctx, arch, hf_dir)
    out = {}
    for name, batch in batches.items():
        if hasattr(model, "vision"):
            logits = forward_vl_logits(
                model,
                ctx,
                batch["input_ids"],
                vocab_size=arch.vocab_size,
                attention_mask_BS=batch["attention_mask"],
                pixel_values_PC=batch["pixel_values"],
                image_grid_thw_N3=batch["image_grid_thw"],
            )
        else:
            logits = forward_logits(model, ctx, batch["input_ids"], vocab_size=arch.vocab_size)
        out[name] = None if logits is None else logits.float().cpu()
    keep = ctx.is_last_stage and ctx.tp_rank == 0 and ctx.cp_rank == 0 and ctx.dp_rank == 0
    ctx.destroy()
    return out if keep else None


def max_logit_diffs(
    reference: dict[str, torch.Tensor], engine: dict[str, torch.Tensor], batches: dict[str, Batch]
) -> dict[str, float]:
    """Max |engine - reference| over the real (unpadded) tokens of each batch."""
    diffs = {}
    for name, ref_BSV in reference.items():
        mask_BS = batches[name]["attention_mask"].bool()
        diffs[name] = float((engine[name] - ref_BSV)[mask_BS].abs().max())
    return diffs
