"""The HF <-> Megatron name table of the Qwen2 / Qwen2.5 language model.

One row per Megatron tensor: its name(s) in the model (local-spec name first, Transformer Engine
name second, where they differ), the HF tensor(s) it is made of, their expected HF shapes and
the TP layout. ``{i}`` is the global layer index; ``{p}`` the HF prefix of the language model
(``model.`` for Qwen2 and the Qwen2.5-VL release layout, ``model.language_model.`` for the
transformers-5 layout of Qwen2.5-VL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from megatron_metis.checkpoint import layouts
from megatron_metis.checkpoint.layouts import Layout
from megatron_metis.models.arch import Qwen2Arch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class WeightRule:
    mcore: tuple[str, ...]
    """Megatron state-dict names; the first that the model has is used."""
    hf: tuple[str, ...]
    layout: Layout
    hf_shapes: Callable[[Qwen2Arch], tuple[Shape, ...]]
    where: Literal["first", "last", "layer"]
    """Pipeline stage that owns it: the first, the last, or the stage of layer ``{i}``."""

    def mcore_names(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.mcore)

    def hf_names(self, prefix: str, layer: int | None) -> list[str]:
        return [n.format(p=prefix, i=layer) for n in self.hf]


def _q(a: Qwen2Arch) -> int:
    return a.num_heads * a.head_dim


def _kv(a: Qwen2Arch) -> int:
    return a.num_kv_heads * a.head_dim


_L = "decoder.layers.{i}."
_H = "{p}layers.{i}."

LAYER_RULES = (
    WeightRule(
        mcore=(_L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight"),
        hf=(_H + "input_layernorm.weight",),
        layout=layouts.REPLICATED,
        hf_shapes=lambda a: ((a.hidden_size,),),
        where="layer",
    ),
    WeightRule(
        mcore=(_L + "self_attention.linear_qkv.weight",),
        hf=tuple(_H + f"self_attn.{x}_proj.weight" for x in "qkv"),
        layout=layouts.FUSED_QKV,
        hf_shapes=lambda a: (
            (_q(a), a.hidden_size),
            (_kv(a), a.hidden_size),
            (_kv(a), a.hidden_size),
        ),
        where="layer",
    ),
    WeightRule(
        mcore=(_L + "self_attention.linear_qkv.bias",),
        hf=tuple(_H + f"self_attn.{x}_proj.bias" for x in "qkv"),
        layout=layouts.FUSED_QKV,
        hf_shapes=lambda a: ((_q(a),), (_kv(a),), (_kv(a),)),
        where="layer",
    ),
    WeightRule(
        mcore=(_L + "self_attention.linear_proj.weight",),
        hf=(_H + "self_attn.o_proj.weight",),
        layout=layouts.SPLIT_COLUMNS,
        hf_shapes=lambda a: ((a.hidden_size, _q(a)),),
        where="layer",
    ),
    WeightRule(
        mcore=(_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight"),
        hf=(_H + "post_attention_layernorm.weight",),
        layout=layouts.REPLICATED,
        hf_shapes=lambda a: ((a.hidden_size,),),
        where="layer",
    ),
    WeightRule(
        mcore=(_L + "mlp.linear_fc1.weight",),
        hf=(_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        layout=layouts.GATE_UP,
        hf_shapes=lambda a: ((a.ffn_hidden_size, a.hidden_size),) * 2,
        where="layer",
    ),
    WeightRule(
        mcore=(_L + "mlp.linear_fc2.weight",),
        hf=(_H + "mlp.down_proj.weight",),
        layout=layouts.SPLIT_COLUMNS,
        hf_shapes=lambda a: ((a.hidden_size, a.ffn_hidden_size),),
        where="layer",
    ),
)

EMBEDDING_RULE = WeightRule(
    mcore=("embedding.word_embeddings.weight",),
    hf=("{p}embed_tokens.weight",),
    layout=layouts.VOCAB_ROWS,
    hf_shapes=lambda a: ((a.vocab_size, a.hidden_size),),
    where="first",
)
FINAL_NORM_RULE = WeightRule(
    mcore=("decoder.final_layernorm.weight",),
    hf=("{p}norm.weight",),
    layout=layouts.REPLICATED,
    hf_shapes=lambda a: ((a.hidden_size,),),
    where="last",
)
OUTPUT_RULE = WeightRule(
    mcore=("output_layer.weight",),
    hf=("lm_head.weight",),
    layout=layouts.VOCAB_ROWS,
    hf_shapes=lambda a: ((a.vocab_size, a.hidden_size),),
    where="last",
)
# With tied embeddings the last pipeline stage keeps its own copy of the embedding as the output
# layer (Megatron keeps the two in sync); it is loaded from the embedding and never exported.
TIED_OUTPUT_RULE = WeightRule(
    mcore=OUTPUT_RULE.mcore,
    hf=EMBEDDING_RULE.hf,
    layout=layouts.VOCAB_ROWS,
    hf_shapes=EMBEDDING_RULE.hf_shapes,
    where="last",
)


def language_model_rules(arch: Qwen2Arch) -> list[tuple[WeightRule, int | None]]:
    """Every (rule, global layer) of the language model, in the order HF checkpoints list them."""
    rows: list[tuple[WeightRule, int | None]] = [(EMBEDDING_RULE, None)]
    rows += [(rule, i) for i in range(arch.num_layers) for rule in LAYER_RULES]
    rows.append((FINAL_NORM_RULE, None))
    rows.append((TIED_OUTPUT_RULE if arch.tie_word_embeddings else OUTPUT_RULE, None))
    return rows


def detect_hf_prefix(names: list[str]) -> str:
    """``model.`` (Qwen2, Qwen2.5-VL release files) or ``model.language_model.`` (HF 5)."""
    if any(n.startswith("model.language_model.") for n in names):
        return "model.language_model."
    return "model."
