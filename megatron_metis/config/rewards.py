"""Config section of verifiable rewards: reward weights and the verifier pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_metis.config.loader import ConfigError


@dataclass(kw_only=True, frozen=True)
class RewardConfig:
    accuracy_weight: float = 1.0
    """Weight of the 0/1 accuracy reward (rule-based verifier)."""
    format_weight: float = 0.5
    """Weight of the 0/1 format reward (``<think>..</think><answer>..\\boxed{}..</answer>``).
    0.5 is the MM-EUREKA reference value (the paper's own weight is unknown)."""
    num_workers: int = 2
    """Verifier worker processes; 0 verifies in the calling process (main thread only)."""
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    """How workers start; never ``fork`` since the trainer process has torch and threads."""
    timeout_s: float = 3.0
    """Per-response verification budget; math-verify's own timeouts use its ceiling in seconds
    and a worker still busy ``kill_grace_s`` later is killed. The response scores 0."""
    kill_grace_s: float = 1.0
    """Extra time past ``timeout_s`` before a stuck worker is killed and restarted."""
    batch_timeout_s: float = 600.0
    """Deadline of one ``score`` call; responses still unverified then score 0 (counted)."""
    chunk_size: int = 64
    """Most responses sent to a worker at once."""
    max_answer_chars: int = 1000
    """An extracted answer longer than this scores 0 without being parsed."""
    max_answer_depth: int = 16
    """An extracted answer with deeper bracket nesting scores 0 without being parsed (deeply
    nested LaTeX costs math-verify seconds and is never a real answer)."""
    gold_cache_size: int = 4096
    """Parsed gold answers kept per worker (LRU)."""

    def validate(self) -> None:
        for key in ("accuracy_weight", "format_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"rewards.{key} must be >= 0, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"rewards.num_workers must be >= 0, got {self.num_workers}")
        for key in ("timeout_s", "batch_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"rewards.{key} must be > 0, got {getattr(self, key)}")
        if self.kill_grace_s < 0:
            raise ConfigError(f"rewards.kill_grace_s must be >= 0, got {self.kill_grace_s}")
        for key in ("chunk_size", "max_answer_chars", "max_answer_depth", "gold_cache_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rewards.{key} must be >= 1, got {getattr(self, key)}")
