"""Layer specs: Transformer Engine layers on GPUs, Megatron's local layers elsewhere.

This is the only module that decides whether Transformer Engine is used; the choice is made
once, when the model is built.
"""

from __future__ import annotations

import importlib.util

import torch

from megatron_metis.config import ConfigError, ModelConfig


def transformer_engine_available() -> bool:
    """True when TE's PyTorch extension imports (it never does on a CPU box)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def use_transformer_engine(cfg: ModelConfig, device: torch.device) -> bool:
    """Resolve ``model.transformer_impl`` and check that ``model.fp8`` can be honoured."""
    if cfg.transformer_impl == "local":
        use_te = False
    elif cfg.transformer_impl == "transformer_engine":
        if device.type != "cuda" or not transformer_engine_available():
            raise ConfigError(
                "model.transformer_impl=transformer_engine needs a CUDA device and an importable "
                "transformer_engine (use the NGC container or `pip install .[gpu]`)"
            )
        use_te = True
    else:
        use_te = device.type == "cuda" and transformer_engine_available()
    if cfg.fp8 != "none":
        if not use_te:
            raise ConfigError(
                f"model.fp8={cfg.fp8!r} needs Transformer Engine on a CUDA device; "
                f"this run uses local layers on {device.type}"
            )
        if torch.cuda.get_device_capability(device) < (9, 0):
            raise ConfigError(f"model.fp8={cfg.fp8!r} needs a Hopper (sm90) or newer GPU")
    return use_te


def gpt_layer_spec(use_te: bool, context_parallel: bool = False):
    """The Megatron-Core ``ModuleSpec`` of one Qwen2 decoder layer.

    Transformer Engine's attention implements context parallelism itself; the local spec gets
    PyTorch's SDPA as core attention (``models.local_attention``), with the K/V all-gathered over
    the CP group when CP > 1.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from megatron_metis.models import local_attention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = (
        local_attention.ContextParallelSdpaAttention
        if context_parallel
        else local_attention.SdpaDotProductAttention
    )
    return spec
