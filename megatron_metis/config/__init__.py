"""Typed config tree (``MetisConfig``) loaded from YAML recipes with dotted overrides."""

from megatron_metis.config.data import DataConfig
from megatron_metis.config.engine import (
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
)
from megatron_metis.config.loader import ConfigError
from megatron_metis.config.rewards import RewardConfig
from megatron_metis.config.rl import GRPOConfig, RolloutConfig
from megatron_metis.config.schema import MetisConfig, load_config, save_resolved_config
from megatron_metis.config.sft import SFTConfig
from megatron_metis.config.stages import EvalConfig, ExpertConfig, PipelineConfig, TriageConfig
from megatron_metis.config.train import TrainConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExpertConfig",
    "GRPOConfig",
    "LoggingConfig",
    "MetisConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PipelineConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "TriageConfig",
    "TrainConfig",
    "load_config",
    "save_resolved_config",
]
