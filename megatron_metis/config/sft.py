"""Config section of the SFT phase: epochs, loss normalisation, sample length, targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_metis.config.loader import ConfigError


@dataclass(kw_only=True, frozen=True)
class SFTConfig:
    epochs: int = 1
    loss_norm: Literal["token", "sequence"] = "token"
    """``token``: summed NLL of the assistant tokens / their count over all micro-batches and
    data-parallel ranks; ``sequence``: each sample's token mean, averaged over samples."""
    max_seq_len: int = 4096
    """Samples longer than this are truncated (the count is reported)."""
    pack_sequences: bool = True
    """Pack several samples into one row (block-diagonal attention, positions restart)."""
    response_field: str = "response"
    """Row field holding the assistant target of each conversation; ``expert`` trains on the
    expert solutions of a problem file (the tiny recipe's warm-up)."""
    shuffle: bool = True
    """Reshuffle the conversations every epoch (seeded by ``run.seed`` and the epoch)."""

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"sft.epochs must be >= 1, got {self.epochs}")
        if self.max_seq_len < 2:
            raise ConfigError(f"sft.max_seq_len must be >= 2, got {self.max_seq_len}")
        if not self.response_field:
            raise ConfigError("sft.response_field must not be empty")
