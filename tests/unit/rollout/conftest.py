"""The rollout tests' models: in-memory tiny Qwen2 models for the tiny tokenizer."""

from __future__ import annotations

import pytest
from tiny_models import sampling_qwen2


@pytest.fixture()
def tiny_model_factory(tiny_tokenizer):
    return lambda seed=0: sampling_qwen2(tiny_tokenizer, seed=seed)
