"""Core attention of Megatron's local layers (no Transformer Engine): PyTorch's SDPA.

Megatron-Core's local ``DotProductAttention`` materialises the ``[b * heads, s, s]`` scores, fills
the mask and runs an unfused softmax: on a CPU that was most of a training step of the tiny model
(``tools/bench_attention.py`` measures both). ``SdpaDotProductAttention`` keeps Megatron's module,
its constructor and its ``[s, b, heads, dim] -> [s, b, heads * dim]`` contract, and computes the
same function with ``torch.nn.functional.scaled_dot_product_attention``: a fused kernel, grouped
query attention without repeating K/V, no score buffer kept for the backward pass.

Megatron's mask is boolean with True = masked. A query row with every key masked (a left-padding
position) gets uniform weights over all keys in Megatron's softmax (every score is filled with
-10000), so its output is the mean of the values; here too, where SDPA alone would return NaN.

Megatron-Core's ``DotProductAttention`` also refuses ``context_parallel_size > 1``: only Transformer
Engine's attention implements CP (ring exchange of K/V blocks). ``ContextParallelSdpaAttention``
all-gathers the keys and values of the whole sequence over the CP group and attends with its local
queries, under the mask rows of its positions (``[b, 1, s, S]``, built by
``models.forward.shard_microbatch``). That costs ``S`` keys of memory per rank instead of TE's
``S / cp``, which is fine for the CPU path it serves: making CP runnable and testable where TE
cannot be installed.

``SdpaSpecProvider`` is Megatron's ``LocalSpecProvider`` with these as its core attention:
``models.specs`` builds the local layer spec from it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_metis.parallel.context_parallel import gather_sequence


class SdpaDotProductAttention(DotProductAttention):
    """Megatron's ``DotProductAttention`` computed by ``F.scaled_dot_product_attention``."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        unsupported = {
            "softmax_type": config.softmax_type != "vanilla",
            "window_size": config.window_size is not None,
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
        }
        named = [key for key, on in unsupported.items() if on]
        if named:
            raise ValueError(
                f"the local SDPA attention does not implement {', '.join(named)}; "
                "use model.transformer_impl=transformer_engine"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> ``[sq, b, np * hn]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("the local attention takes packed rows as a block-causal mask only")
        sq, b, heads, dim = query.shape
        q_BNSH, k_BGSH, v_BGSH = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sk = key.shape[0]
        if attention_mask is None and self.attn_mask_type == AttnMaskType.causal and sq > 1:
            # Megatron's softmax then applies its default causal mask, aligned bottom-right
            attention_mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).triu(
                sk - sq + 1
            )
        visible, blind = None, None
        if attention_mask is not None:
            masked = attention_mask.bool()
            blind = masked.all(dim=-1, keepdim=True)  # rows that see no key
            visible = ~masked | blind  # SDPA would return NaN for them
        out_BNSH = F.scaled_dot_product_attention(
            q_BNSH,
            k_BGSH,
            v_BGSH,
            attn_mask=visible,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=heads != key.shape[2],
        )
        if blind is not None:  # Megatron's uniform weights: the mean of the values
            mean_BNSH = v_BGSH.mean(dim=2, keepdim=True).repeat_interleave(
                heads // v_BGSH.shape[1], 1
            )
            out_BNSH = torch.where(blind, mean_BNSH, out_BNSH)
        return out_BNSH.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)


class ContextParallelSdpaAttention(SdpaDotProductAttention):
    """Local queries against the CP-gathered keys and values (see the module docstring)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs) -> None:
        pg_collection = kwargs.get("pg_collection")
        self.cp_group = getattr(pg_collection, "cp", None)
        if self.cp_group is None:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group()
        # The parent asserts CP == 1: its math is per query block, which is all it runs here.
        local = dataclasses.replace(config, context_parallel_size=1)
        super().__init__(local, layer_number, attn_mask_type, attention_type, **kwargs)

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        """query/key/value ``[s, b, heads, head_dim]`` (local positions) -> ``[s, b, hp]``."""
        if attention_mask is None:
            raise ValueError("context-parallel attention needs an explicit [b, 1, s, S] mask")
        key = gather_sequence(key, 0, self.cp_group)
        value = gather_sequence(value, 0, self.cp_group)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


class SdpaSpecProvider(LocalSpecProvider):
    """Megatron's local layers, with ``SdpaDotProductAttention`` as core attention, or
    ``ContextParallelSdpaAttention`` under context parallelism (``context_parallel``)."""

    def __init__(self, *, context_parallel: bool = False) -> None:
        self.context_parallel = context_parallel

    def core_attention(self) -> type:
        """Which module to use for attention."""
        if self.context_parallel:
            return ContextParallelSdpaAttention
        return SdpaDotProductAttention
