"""Build the engine model for a Hugging Face checkpoint folder, whatever its model family."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_metis.config import ConfigError, ModelConfig
from megatron_metis.models.arch import Qwen2Arch
from megatron_metis.models.qwen2 import build_qwen2_model
from megatron_metis.parallel import ParallelContext

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_5_vl")


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config.json in {hf_dir}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err


def model_type_of(hf_config: dict, source: str | Path) -> str:
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return model_type


def build_model(
    hf_config: dict,
    ctx: ParallelContext,
    cfg: ModelConfig,
    *,
    source: str | Path = "config",
    returns_hidden_states: bool = False,
) -> tuple[torch.nn.Module, Qwen2Arch]:
    """This rank's shard of the model described by ``hf_config`` (randomly initialised).

    Returns (model, arch): a ``GPTModel`` for ``qwen2``, a ``Qwen2_5_VLModel`` (vision tower +
    ``GPTModel`` with M-RoPE) for ``qwen2_5_vl``; ``arch`` is the decoder's architecture.
    With ``returns_hidden_states`` the decoder is a ``HiddenStateGPTModel``: its last stage
    returns the final hidden states, for the fused log-prob kernel, instead of logits.
    """
    model_type = model_type_of(hf_config, source)
    arch = Qwen2Arch.from_hf_dict(hf_config)
    if model_type == "qwen2_5_vl":
        from megatron_metis.models.qwen2_5_vl import build_qwen2_5_vl_model

        model = build_qwen2_5_vl_model(
            hf_config, arch, ctx, cfg, returns_hidden_states=returns_hidden_states
        )
        return model, arch
    return build_qwen2_model(arch, ctx, cfg, returns_hidden_states=returns_hidden_states), arch
