"""The rollout engine's memory choreography across steps (``trainer.rollout_io.RolloutSession``),
recorded by a fake engine around the HF engine: weights wake before the stream, the KV cache
only after it, generation only when both are awake, sleep after; the stream happens when the
policy changed or the engine dropped its weights (vLLM's level-2 sleep), and only then."""

from __future__ import annotations

import pytest
from tiny_models import write_tiny_assets
from trainer_worker import session_worker

from megatron_metis.parallel import spawn

STREAM = ["wake:weights", "load_weights", "wake:kv_cache", "score", "generate", "sleep"]
"""A step that streams: ``score`` is the log-prob probe, after the KV cache is back."""
NO_STREAM = ["wake:weights", "wake:kv_cache", "generate", "sleep"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("session")
    hf, data = write_tiny_assets(root)
    return hf, data, root


def test_the_stream_waits_for_a_new_policy(assets):
    hf, data, root = assets
    steps = spawn(session_worker, 1, hf, data, str(root / "keep"), False, timeout_s=300)[0]
    assert steps == [STREAM, NO_STREAM, STREAM]


def test_dropped_weights_are_streamed_again_even_without_an_update(assets):
    """Level-2 sleep discards the weights: generating from them would sample from garbage."""
    hf, data, root = assets
    steps = spawn(session_worker, 1, hf, data, str(root / "drop"), True, timeout_s=300)[0]
    assert steps == [STREAM, STREAM, STREAM]


def test_one_rank_scores_and_every_engine_rank_takes_its_decisions(assets):
    """At TP=2 with an engine on both ranks (vLLM's SPMD layout), rank 1's verifier would fail
    (a timeout): only the generator scores, each round's verdicts are broadcast, and both ranks
    make the same generate calls (2 rounds: the first round's groups are all filtered)."""
    from trainer_worker import collect_worker

    hf, data, root = assets
    ranks = spawn(collect_worker, 2, hf, data, str(root / "collect"), timeout_s=300)
    assert ranks[0] == ranks[1]
    assert ranks[0]["generate_calls"] == 2 and ranks[0]["rounds"] == 2
    assert len(ranks[0]["groups"]) == 2
