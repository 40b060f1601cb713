"""Fixtures of the stage tests: a main-process verifier, the model wrapper."""

from __future__ import annotations

import pytest

from megatron_metis.config.rewards import RewardConfig
from megatron_metis.rewards.scorer import RewardScorer
from megatron_metis.stages.requests import GenerationModel


@pytest.fixture()
def make_model(tiny_tokenizer):
    return lambda engine: GenerationModel(engine=engine, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(RewardConfig(num_workers=0)) as s:
        yield s
