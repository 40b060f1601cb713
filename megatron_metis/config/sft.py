"""Config section of the SFT phase: batch size, epochs, loss normalisation, sample length,
targets. Row packing is the engine's (``train.pack_sequences``), the same switch for RL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_metis.config.loader import ConfigError


@dataclass(kw_only=True, frozen=True)
class SFTConfig:
    global_batch_size: int = 64
    """Conversations per optimizer step, over all data-parallel ranks (must divide by DP)."""
    epochs: int = 1
    loss_norm: Literal["token", "sequence"] = "token"
    """``token``: summed NLL of the assistant tokens / their count over all micro-batches and
    data-parallel ranks; ``sequence``: each sample's token mean, averaged over samples."""
    max_seq_len: int = 4096
    """Samples longer than this are truncated (the count is reported)."""
    response_field: str = "response"
    """Row field holding the assistant target of each conversation; ``expert`` trains on the
    expert solutions of a problem file (the tiny recipe's warm-up)."""
    shuffle: bool = True
    """Reshuffle the conversations every epoch (seeded by ``run.seed`` and the epoch)."""

    def validate(self) -> None:
        if self.global_batch_size < 1:
            raise ConfigError(f"sft.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.epochs < 1:
            raise ConfigError(f"sft.epochs must be >= 1, got {self.epochs}")
        if self.max_seq_len < 2:
            raise ConfigError(f"sft.max_seq_len must be >= 2, got {self.max_seq_len}")
        if not self.response_field:
            raise ConfigError("sft.response_field must not be empty")
