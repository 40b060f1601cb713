"""Shared fixtures of the reward tests: one small verifier pool per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from megatron_metis.config.rewards import RewardConfig
from megatron_metis.rewards import RewardScorer


@pytest.fixture(scope="module")
def scorer() -> Iterator[RewardScorer]:
    cfg = RewardConfig(num_workers=2, timeout_s=1.0, kill_grace_s=0.5, format_weight=0.5)
    with RewardScorer(cfg) as pool:
        yield pool
