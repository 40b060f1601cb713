"""Config sections of the engine: run, parallel layout, model, optimizer, checkpoints, logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_metis.config.loader import ConfigError


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    """Everything a run writes (resolved config, checkpoints, metrics) goes under this folder."""
    seed: int = 1234


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (layers are split evenly over the stages)."""
    cp: int = 1
    """Context-parallel size."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when available, else the CPU (gloo, local Megatron layers, CPU shim)."""
    timeout_s: int = 600
    """Collective timeout; keeps a hung rank from hanging the job forever."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (TP > 1, Transformer Engine layers only)."""

    def validate(self) -> None:
        for key in ("tp", "pp", "cp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(self, key)}")
        if self.timeout_s < 1:
            raise ConfigError(f"parallel.timeout_s must be >= 1, got {self.timeout_s}")


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    hf_dir: str = ""
    """HF checkpoint folder (config.json, safetensors, tokenizer) the model starts from."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter and compute dtype of the policy."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer specs: ``auto`` picks Transformer Engine on CUDA when it imports, else local layers."""
    fp8: Literal["none", "e4m3", "hybrid"] = "none"
    """FP8 recipe of Transformer Engine layers; needs TE and a Hopper (sm90+) GPU."""
    make_vocab_size_divisible_by: int = 128
    """Embedding rows are padded to a multiple of lcm(this, tp); a TP-independent value keeps
    checkpoints loadable at another TP size."""
    recompute_activations: bool = False
    freeze_vision_tower: bool = False
    """Qwen2.5-VL: no gradients for the ViT (patch embedding and blocks)."""
    freeze_merger: bool = False
    """Qwen2.5-VL: no gradients for the patch merger (the projection into the decoder)."""
    init_tiny: bool = False
    """CPU recipes: create a tiny random Qwen2.5-VL (``models.tiny``) at ``hf_dir`` when the
    folder has no config.json yet."""

    def validate(self) -> None:
        if self.make_vocab_size_divisible_by < 1:
            raise ConfigError("model.make_vocab_size_divisible_by must be >= 1")
        if self.fp8 != "none" and self.transformer_impl == "local":
            raise ConfigError(
                "model.fp8 needs model.transformer_impl 'auto' or 'transformer_engine'"
            )


@dataclass(kw_only=True, frozen=True)
class OptimizerConfig:
    name: Literal["adam", "sgd"] = "adam"
    """Megatron's Adam; with ``weight_decay`` > 0 it is AdamW (decoupled decay)."""
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: Literal["constant", "linear", "cosine"] = "constant"
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (only matters when DP > 1)."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("optimizer.min_lr must be in [0, optimizer.lr]")
        if self.warmup_steps < 0:
            raise ConfigError("optimizer.warmup_steps must be >= 0")


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    save_interval: int = 0
    """Save a training checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Older training checkpoints are deleted; 0 keeps all."""
    load_dir: str = ""
    """Resume from this checkpoint folder; empty: resume from the run's own latest, if any."""
    export_hf: bool = True
    """Write a Hugging Face checkpoint (safetensors + config + tokenizer) at the end of a phase."""
    max_shard_size_mb: int = 5000

    def validate(self) -> None:
        if self.save_interval < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")
        if self.max_shard_size_mb < 1:
            raise ConfigError("checkpoint.max_shard_size_mb must be >= 1")


@dataclass(kw_only=True, frozen=True)
class LoggingConfig:
    log_interval: int = 1
    tensorboard: bool = True
    jsonl: bool = True
    """Append one JSON line of metrics per logged step to ``<output_dir>/metrics.jsonl``."""
    progress_bar: bool = True

    def validate(self) -> None:
        if self.log_interval < 1:
            raise ConfigError("logging.log_interval must be >= 1")
