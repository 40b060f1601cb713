"""The rollout engine seam: protocol, request/completion types, weight streaming, factory.

Implementations live in their own modules and are imported only when built:
``hf_engine.HFRolloutEngine`` (transformers) and ``vllm_engine.VLLMRolloutEngine`` (the only
vLLM importer).
"""

from megatron_metis.rollout.engine import (
    Completion,
    RolloutEngine,
    RolloutRequest,
    SamplingParams,
    TensorChecksum,
    logprob_temperature,
    tensor_checksum,
)
from megatron_metis.rollout.factory import build_rollout_engine
from megatron_metis.rollout.weight_sync import (
    SyncReport,
    WeightSyncError,
    check_logprobs,
    stream_weights,
)

__all__ = [
    "Completion",
    "RolloutEngine",
    "RolloutRequest",
    "SamplingParams",
    "SyncReport",
    "TensorChecksum",
    "WeightSyncError",
    "build_rollout_engine",
    "check_logprobs",
    "logprob_temperature",
    "stream_weights",
    "tensor_checksum",
]
