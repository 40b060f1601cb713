"""The one typed config tree of a run, and how recipes become it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_metis.config.data import DataConfig
from megatron_metis.config.engine import (
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
)
from megatron_metis.config.loader import (
    ConfigError,
    apply_overrides,
    build_dataclass,
    dump_yaml,
    read_recipe,
)
from megatron_metis.config.rewards import RewardConfig
from megatron_metis.config.rl import GRPOConfig, RolloutConfig
from megatron_metis.config.sft import SFTConfig
from megatron_metis.config.stages import EvalConfig, ExpertConfig, PipelineConfig, TriageConfig
from megatron_metis.config.train import TrainConfig


@dataclass(kw_only=True, frozen=True)
class MetisConfig:
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    triage: TriageConfig = field(default_factory=TriageConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Checks across sections."""
        vllm_tp, tp = self.rollout.vllm_tensor_parallel_size, self.parallel.tp
        if self.rollout.backend == "vllm" and tp % vllm_tp:
            raise ConfigError(
                f"rollout.vllm_tensor_parallel_size={vllm_tp} must divide parallel.tp={tp}: one "
                "vLLM engine is a block of consecutive ranks, and a block that is not inside one "
                "tensor-parallel group spans data-parallel replicas, which sample different prompts"
            )


def load_config(recipe: str | Path | None, overrides: Sequence[str] = ()) -> MetisConfig:
    """Recipe YAML (optional) + dotted overrides -> validated ``MetisConfig``.

    Raises:
        ConfigError: unknown key, wrong type or invalid value; the message names the key.
    """
    raw = read_recipe(recipe) if recipe is not None else {}
    apply_overrides(raw, overrides)
    return build_dataclass(MetisConfig, raw)


def save_resolved_config(cfg: MetisConfig, output_dir: str | Path) -> Path:
    """Write the fully resolved config to ``<output_dir>/config.yaml`` and return its path."""
    path = Path(output_dir) / "config.yaml"
    dump_yaml(cfg, path)
    return path
