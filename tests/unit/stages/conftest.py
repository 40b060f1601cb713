"""Fixtures of the stage tests: a main-process verifier, a rollout client."""

from __future__ import annotations

import pytest

from megatron_metis.config.rewards import RewardConfig
from megatron_metis.rewards.scorer import RewardScorer
from megatron_metis.rollout.client import RolloutClient


@pytest.fixture()
def make_model(tiny_tokenizer):
    return lambda engine: RolloutClient(engine, tiny_tokenizer, system_prompt="S")


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(num_workers=0)) as s:
        yield s
