"""HF <-> Megatron weight conversion (TP/PP sharding) and distributed training checkpoints."""

from megatron_metis.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_metis.checkpoint.dist_ckpt import load_model_checkpoint, save_model_checkpoint
from megatron_metis.checkpoint.hf_convert import (
    export_hf_weights,
    load_hf_weights,
    save_hf_checkpoint,
)
from megatron_metis.checkpoint.hf_io import CheckpointError, HFCheckpointReader

__all__ = [
    "CheckpointError",
    "HFCheckpointReader",
    "export_hf_weights",
    "hf_to_megatron",
    "load_hf_weights",
    "load_model_checkpoint",
    "megatron_to_hf",
    "save_hf_checkpoint",
    "save_model_checkpoint",
]
