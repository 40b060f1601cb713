"""Whole-checkpoint conversions used by the tools: HF folder <-> Megatron dist checkpoint."""

from __future__ import annotations

from pathlib import Path

from megatron_metis.checkpoint.dist_ckpt import (
    load_model_checkpoint,
    read_checkpoint_meta,
    save_model_checkpoint,
)
from megatron_metis.checkpoint.hf_convert import load_hf_weights, save_hf_checkpoint
from megatron_metis.config import ModelConfig
from megatron_metis.models.factory import build_model, read_hf_config
from megatron_metis.parallel import ParallelContext


def hf_to_megatron(
    hf_dir: str | Path, out_dir: str | Path, ctx: ParallelContext, cfg: ModelConfig
) -> Path:
    """Collective: load ``hf_dir`` at this run's TP/PP and save a dist checkpoint to ``out_dir``."""
    model, arch = build_model(read_hf_config(hf_dir), ctx, cfg, source=hf_dir)
    load_hf_weights(model, ctx, arch, hf_dir)
    return save_model_checkpoint(model, ctx, out_dir, arch=arch, hf_dir=hf_dir)


def megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    ctx: ParallelContext,
    cfg: ModelConfig,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Collective: load a dist checkpoint at this run's TP/PP and write a HF folder.

    Config, tokenizer and generation files come from the checkpoint's ``hf_config/``, so
    transformers and vLLM load ``out_dir`` directly.
    """
    read_checkpoint_meta(ckpt_dir)  # a clear error if this is not a complete checkpoint
    hf_config_dir = Path(ckpt_dir) / "hf_config"
    model, arch = build_model(read_hf_config(hf_config_dir), ctx, cfg, source=hf_config_dir)
    load_model_checkpoint(model, ctx, ckpt_dir, arch=arch)
    save_hf_checkpoint(
        model,
        ctx,
        arch,
        out_dir,
        side_files_from=hf_config_dir,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )
    return Path(out_dir)
