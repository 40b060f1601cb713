"""Engine models on Megatron-Core: Qwen2 language model (and Qwen2.5-VL on top of it)."""

from megatron_metis.models.arch import Qwen2Arch
from megatron_metis.models.factory import build_model, read_hf_config
from megatron_metis.models.forward import forward_logits, gather_vocab_logits

__all__ = ["Qwen2Arch", "build_model", "forward_logits", "gather_vocab_logits", "read_hf_config"]
