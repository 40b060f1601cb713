"""The Qwen2 / Qwen2.5 language model as a Megatron-Core ``GPTModel``.

Qwen2 = RMSNorm, SwiGLU MLP, grouped-query attention with a bias on Q/K/V only, rotate-half RoPE
(M-RoPE for Qwen2.5-VL), optionally tied input/output embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_metis.config import ModelConfig
from megatron_metis.models.arch import Qwen2Arch
from megatron_metis.models.specs import qwen2_layer_spec, spec_provider, use_transformer_engine
from megatron_metis.parallel import ParallelContext

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_transformer_config(arch: Qwen2Arch, ctx: ParallelContext, cfg: ModelConfig, use_te: bool):
    """The one translation of (architecture, layout, model section) into Megatron's config."""
    from megatron.core.transformer import TransformerConfig

    dtype = _DTYPES[cfg.dtype]
    on_gpu = ctx.device.type == "cuda"
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        layernorm_epsilon=arch.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ctx.tp,
        pipeline_model_parallel_size=ctx.pp,
        context_parallel_size=ctx.cp,
        sequence_parallel=use_te and ctx.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp8=None if cfg.fp8 == "none" else cfg.fp8,
        use_cpu_initialization=not on_gpu,
        # Fused kernels exist only on GPUs (TE / Apex / Triton); the local path runs unfused.
        bias_activation_fusion=on_gpu and use_te,
        masked_softmax_fusion=on_gpu and use_te,
        persist_layer_norm=False,
        bias_dropout_fusion=on_gpu and use_te,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        mrope_section=list(arch.mrope_section) if arch.mrope_section else None,
        recompute_granularity="full" if cfg.recompute_activations else None,
        recompute_method="uniform" if cfg.recompute_activations else None,
        recompute_num_layers=1 if cfg.recompute_activations else None,
    )


def build_qwen2_model(
    arch: Qwen2Arch, ctx: ParallelContext, cfg: ModelConfig, *, returns_hidden_states: bool = False
):
    """Build this rank's part (TP shard, PP stage) of the language model, randomly initialised.

    A ``GPTModel``, or with ``returns_hidden_states`` a ``HiddenStateGPTModel``, whose last
    stage returns the final hidden states instead of logits (``models.output_head``: the fused
    log-prob kernel takes them). Weights come from ``checkpoint.load_hf_weights`` or a training
    checkpoint afterwards.
    """
    from megatron.core.models.gpt import GPTModel

    from megatron_metis.models.output_head import HiddenStateGPTModel

    arch.check_parallel(ctx.tp, ctx.pp)
    use_te = use_transformer_engine(cfg, ctx.device)
    config = build_transformer_config(arch, ctx, cfg, use_te)
    model_class = HiddenStateGPTModel if returns_hidden_states else GPTModel
    model = model_class(
        config=config,
        transformer_layer_spec=qwen2_layer_spec(spec_provider(use_te, context_parallel=ctx.cp > 1)),
        vocab_size=arch.padded_vocab_size(ctx.tp, cfg.make_vocab_size_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ctx.is_first_stage,
        post_process=ctx.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="mrope" if arch.mrope_section else "rope",
        rotary_base=int(arch.rope_theta),
        pg_collection=ctx.pg_collection,
    )
    return model.to(ctx.device)
