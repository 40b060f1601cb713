"""Layer specs: Transformer Engine layers on GPUs, Megatron's local layers elsewhere.

This is the only module that decides whether Transformer Engine is used. The choice is made
once, when the model is built, the way Megatron-Core makes it: a ``BackendSpecProvider`` is
picked (``spec_provider``) and the layer spec is filled from it (``qwen2_layer_spec``); nothing
edits a spec after it is built.
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


def spec_provider(use_te: bool, *, context_parallel: bool = False):
    """The ``BackendSpecProvider`` of the decoder layers: Megatron-Core's ``TESpecProvider``
    (Transformer Engine's attention implements context parallelism itself), or
    ``local_attention.SdpaSpecProvider``: Megatron's local layers with PyTorch's SDPA as core
    attention, the K/V all-gathered over the CP group when ``context_parallel``."""
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    from megatron_metis.models.local_attention import SdpaSpecProvider

    return SdpaSpecProvider(context_parallel=context_parallel)


def qwen2_layer_spec(backend):
    """The Megatron-Core ``ModuleSpec`` of one Qwen2 decoder layer, filled from ``backend``.

    Qwen2's layer is Megatron's dense GPT layer (RMSNorm, causal self-attention without Q/K
    norms, MLP): the spec of ``get_gpt_layer_with_transformer_engine_spec()`` for a backend that
    fuses the norms into the following linear (Transformer Engine), and of
    ``get_gpt_layer_local_spec(normalization="RMSNorm")`` otherwise, with the backend's core
    attention in both (``tests/unit/engine/test_specs.py`` holds them equal). Megatron's own
    local spec function takes no provider, hence this one.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    if backend.fuse_layernorm_and_linear():
        norm, linear_qkv = IdentityOp, backend.column_parallel_layer_norm_linear()
        # Megatron's TE spec: names of TE's op-fuser MLP in sharded checkpoints
        keys_map = {
            "mlp.0.weight": "mlp.linear_fc1.layer_norm_weight",
            "mlp.0.bias": "mlp.linear_fc1.layer_norm_bias",
            "mlp.1.basic_ops.0.weight": "mlp.linear_fc1.weight",
            "mlp.1.basic_ops.1.bias": "mlp.linear_fc1.bias",
            "mlp.3.basic_ops.0.weight": "mlp.linear_fc2.weight",
            "mlp.3.basic_ops.1.bias": "mlp.linear_fc2.bias",
        }
    else:
        norm, linear_qkv = backend.layer_norm(rms_norm=True), backend.column_parallel_linear()
        # Megatron's local spec: sharded checkpoints keep the names of TE's fused norms
        keys_map = {
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        }
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linear_qkv,
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=get_mlp_module_spec_for_backend(backend=backend),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )
