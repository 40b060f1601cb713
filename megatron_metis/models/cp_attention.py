"""Core attention for context parallelism with Megatron's local layers (CPU, no Transformer
Engine).

Megatron-Core's ``DotProductAttention`` refuses ``context_parallel_size > 1``: only Transformer
Engine's attention implements CP (ring exchange of K/V blocks). Without TE, each CP rank here
all-gathers the keys and values of the whole sequence, then runs Megatron's own
``DotProductAttention`` math for its local queries against every key, with the rows of the
attention mask that belong to its positions. That costs ``S`` keys of memory per rank instead of
TE's ``S / cp``, which is fine for the CPU path it serves: its job is to make CP runnable and
testable (TP x PP x CP parity) where TE cannot be installed.

The attention mask given to this module is ``[b, 1, s, S]``: the local query rows
(``parallel.context_parallel.cp_positions``) against all keys in natural order;
``models.forward.run_pipeline`` builds it.
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_metis.parallel.context_parallel import gather_sequence


class ContextParallelDotProductAttention(DotProductAttention):
    """``DotProductAttention`` of local queries against the CP-gathered keys and values."""

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
