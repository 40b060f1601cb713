"""``build_rollout_engine``: the rollout backend chosen by ``RolloutConfig.backend``."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_metis.config.rl import RolloutConfig
from megatron_metis.rollout.engine import RolloutEngine


def build_rollout_engine(
    cfg: RolloutConfig,
    hf_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    image_pixels: tuple[int, int] | None = None,
) -> RolloutEngine:
    """The engine for ``cfg.backend``, built from the HF folder ``hf_dir``.

    ``hf``: ``HFRolloutEngine`` on ``device`` (random weights when the folder has no
    safetensors: the first weight stream fills them). ``vllm``: ``VLLMRolloutEngine`` (imports
    vLLM; inside a ``torch.distributed`` job every rank must build it), whose image processor
    takes ``image_pixels`` = (``data.image_min_pixels``, ``data.image_max_pixels``) for a
    vision-language model.
    """
    if cfg.backend == "hf":
        from megatron_metis.rollout.hf_engine import HFRolloutEngine

        return HFRolloutEngine.from_pretrained(hf_dir, cfg, device=device)
    if cfg.backend == "vllm":
        from transformers import AutoConfig

        from megatron_metis.rollout.vllm_engine import VLLMRolloutEngine

        is_vl = AutoConfig.from_pretrained(hf_dir).model_type == "qwen2_5_vl"
        return VLLMRolloutEngine(
            cfg, hf_dir, image_pixels=image_pixels if is_vl else None, device=device
        )
    raise ValueError(f"unknown rollout backend {cfg.backend!r}")
