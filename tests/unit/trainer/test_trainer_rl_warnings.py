"""The RL loop's warning about responses cut at rollout.max_new_tokens."""

from __future__ import annotations

from megatron_metis.config import load_config
from megatron_metis.trainer.rl_steps import truncation_warning


def _metrics(cut: float, n: float = 100.0) -> dict[str, float]:
    return {"num_responses": n, "num_truncated": cut}


def test_warns_when_many_responses_are_cut_and_still_trained():
    cfg = load_config(None, ["rollout.max_new_tokens=64"])
    warning = truncation_warning(_metrics(12), cfg)
    assert warning is not None
    assert "12%" in warning and "rollout.max_new_tokens=64" in warning
    assert "grpo.overlong=mask" in warning


def test_quiet_below_the_threshold_with_masking_or_without_responses():
    cfg = load_config(None, [])
    assert truncation_warning(_metrics(5), cfg) is None  # 5% is not more than 5%
    assert truncation_warning(_metrics(0, n=0), cfg) is None
    masked = load_config(None, ["grpo.overlong=mask"])
    assert truncation_warning(_metrics(50), masked) is None
