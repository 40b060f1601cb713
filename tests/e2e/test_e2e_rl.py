"""``metis rl`` end to end on a tiny Qwen2.5-VL (CPU): the loop learns a trivially learnable
reward, and a verifier timeout, responses cut at the length limit and a batch whose groups are
all filtered leave the run going, with metrics that say what happened."""

from __future__ import annotations

import json

import pytest
from e2e_helpers import probe_worker, rl_worker
from tiny_models import write_tiny_assets

from megatron_metis.parallel import spawn


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_rl")
    hf, data = write_tiny_assets(root)
    return {"hf": hf, "data": data, "root": root}


def test_rl_raises_a_learnable_reward(assets):
    steps = 12
    extra = [
        f"train.max_steps={steps}",
        "grpo.group_size=8",
        "grpo.num_prompts_per_step=4",
        "grpo.max_sampling_rounds=1",
        "rollout.max_new_tokens=8",
        "rollout.verify_weights=checksum",
        "optimizer.lr=1e-2",
        "checkpoint.save_interval=0",
    ]
    out = str(assets["root"] / "rl_digits")
    metrics = spawn(
        rl_worker, 1, assets["hf"], assets["data"], out, "digits", extra, timeout_s=600
    )[0]
    assert sorted(metrics) == list(range(1, steps + 1))
    first = sum(metrics[s]["reward/mean"] for s in (1, 2)) / 2
    last = sum(metrics[s]["reward/mean"] for s in (steps - 1, steps)) / 2
    assert last > first + 0.05, (first, last)
    # on-policy: the trainer's log-probs of every sampled token (image prompts included) are
    # the rollout engine's, once per step after the weight stream
    assert max(m["rollout_logprob_gap"] for m in metrics.values()) < 1e-4
    row = metrics[steps]
    # training accuracy per category of the training set: the overall accuracy is their mean
    # weighted by the responses of each, so it lies between the smallest and the largest
    with open(f"{assets['data']}/train.jsonl") as f:
        categories = {json.loads(line)["category"] for line in f}
    for m in metrics.values():
        per_category = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("accuracy/")}
        assert set(per_category) <= categories and per_category, m
        assert (
            min(per_category.values()) - 1e-9 <= m["accuracy"] <= max(per_category.values()) + 1e-9
        )
    assert any(m["accuracy"] > 0 for m in metrics.values())
    assert row["num_truncated"] > 0  # 8 new tokens: most responses hit the length limit
    assert row["weight_sync/tensors"] > 0 and row["updates_applied"] == 1
    for key in (
        "loss",
        "clip_frac",
        "entropy",
        "grad_norm",
        "response_length/mean",
        "response_length/max",
        "groups/filtered",
        "tokens_per_s/rollout",
        "tokens_per_s/train",
        "time/generate",
        "time/train",
        "time/weight_sync",
    ):
        assert key in row, key


def test_an_update_moves_log_probs_toward_the_advantages(assets):
    """Repeated updates on one rollout batch: the responses with positive advantage gain
    log-prob, those with negative advantage lose it (the probe of tools/grpo_update_probe.py)."""
    extra = [
        "grpo.group_size=8",
        "grpo.num_prompts_per_step=4",
        "grpo.max_sampling_rounds=1",
        "rollout.max_new_tokens=8",
        "optimizer.lr=1e-3",
    ]
    out = str(assets["root"] / "probe")
    rows = spawn(probe_worker, 1, assets["hf"], assets["data"], out, extra, timeout_s=600)[0]
    assert [r["update"] for r in rows] == [1.0, 2.0, 3.0]
    for r in rows:
        assert r["dlogp_pos"] > 0 > r["dlogp_neg"], r
        assert r["corr"] > 0.3, r
    assert rows[-1]["dlogp_pos"] > rows[0]["dlogp_pos"]  # small steps: it keeps rising


def test_timeouts_truncation_and_all_filtered_batches_do_not_stop_the_run(assets):
    extra = [
        "train.max_steps=2",
        "grpo.group_size=2",
        "grpo.num_prompts_per_step=2",
        "grpo.max_sampling_rounds=2",
        "rollout.max_new_tokens=4",
        "checkpoint.save_interval=0",
    ]
    out = str(assets["root"] / "rl_timeouts")
    metrics = spawn(
        rl_worker, 1, assets["hf"], assets["data"], out, "timeout", extra, timeout_s=600
    )[0]
    assert sorted(metrics) == [1, 2]
    for row in metrics.values():
        assert row["verifier/timeouts"] >= 1
        assert row["num_truncated"] > 0
        assert row["groups/filtered"] == row["groups/sampled"] == 4
        assert row["groups/kept"] == 0 and row["groups/batch_full"] == 0
        assert row["updates_applied"] == 0 and row["updates_skipped_empty_batch"] == 1
