"""The phase loop's interval policy: evaluation and checkpoints every N steps and at the end."""

from __future__ import annotations

from megatron_metis.trainer.loop import due


def test_every_interval_steps_and_after_the_last():
    assert [s for s in range(1, 8) if due(3, s, last=s == 7)] == [3, 6, 7]


def test_interval_zero_means_only_after_the_last_step():
    assert [s for s in range(1, 5) if due(0, s, last=s == 4)] == [4]
