"""Pure tensor functions of the two training phases: the GRPO variant and SFT.

Tensors and a config section go in, ``(loss, metrics)`` comes out. Nothing here knows about
the rollout engine, the model or the parallel layout: the trainer passes the global loss
normalisers in explicitly.
"""

from megatron_metis.algorithms.aggregation import aggregate, local_loss_normalisers
from megatron_metis.algorithms.grpo import (
    DynamicSampler,
    clipped_policy_loss,
    filter_groups,
    group_advantages,
    grpo_loss,
    kl_penalty,
    overlong_penalty,
    shape_rewards,
)
from megatron_metis.algorithms.packing import (
    PackedRow,
    block_causal_mask,
    pack_sequences,
    position_ids_from_cu_seqlens,
)
from megatron_metis.algorithms.sft import (
    ChatTokenIds,
    assistant_target_mask,
    next_token_targets,
    sft_loss,
)

__all__ = [
    "ChatTokenIds",
    "DynamicSampler",
    "PackedRow",
    "aggregate",
    "assistant_target_mask",
    "block_causal_mask",
    "clipped_policy_loss",
    "filter_groups",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "local_loss_normalisers",
    "next_token_targets",
    "overlong_penalty",
    "pack_sequences",
    "position_ids_from_cu_seqlens",
    "sft_loss",
    "shape_rewards",
]
