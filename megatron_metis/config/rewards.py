"""Config section of verifiable rewards (filled in by the rewards issue)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class RewardConfig:
    accuracy_weight: float = 1.0
    format_weight: float = 0.0
