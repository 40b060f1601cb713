"""GRPO pieces against hand-computed numbers (literal expected values)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_metis.algorithms.aggregation import aggregate, local_loss_normalisers
from megatron_metis.algorithms.grpo import (
    DynamicSampler,
    clipped_policy_loss,
    filter_groups,
    group_advantages,
    grpo_loss,
    kl_penalty,
    overlong_penalty,
    shape_rewards,
)
from megatron_metis.config.rl import GRPOConfig


def test_group_advantages_hand_values():
    rewards_BG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 1.0, 1.0]])
    adv_BG = group_advantages(rewards_BG, eps=1e-6)
    # row 0: mean 0.5, unbiased std sqrt(1/3); row 1: all equal -> 0; row 2: mean 1.5, std 1
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = [[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0], [1.5 / (1 + 1e-6), *[-0.5 / (1 + 1e-6)] * 3]]
    torch.testing.assert_close(adv_BG, torch.tensor(expected), rtol=0, atol=1e-6)
    assert torch.isfinite(adv_BG).all()


def test_group_advantages_dr_grpo_has_no_std():
    adv_BG = group_advantages(torch.tensor([[3.0, 1.0, 1.0, 1.0]]), norm_std=False)
    assert adv_BG.tolist() == [[1.5, -0.5, -0.5, -0.5]]


def test_group_advantages_rejects_groups_of_one():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]))


# ratio r = exp(logp - old); eps_low 0.2, eps_high 0.28 -> clip range [0.8, 1.28]
RATIOS = [0.5, 1.1, 1.5, 0.5, 1.1, 1.5]
ADVS = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
# per token -min(rA, clip(r)A):  A>0: -0.5, -1.1, -1.28(clipped) | A<0: 0.8(clipped), 1.1, 1.5
PER_TOKEN = [-0.5, -1.1, -1.28, 0.8, 1.1, 1.5]
# d loss / d logp = -rA where unclipped, 0 where the clipped branch is the minimum
GRAD_PER_TOKEN = [-0.5, -1.1, 0.0, 0.0, 1.1, 1.5]
# the clipped branch is the minimum: A > 0 and r > 1.28, A < 0 and r < 0.8
CLIPPED = [False, False, True, True, False, False]


def test_clipped_objective_both_signs_both_sides():
    old_T = torch.full((6,), -1.0)
    logp_T = (old_T + torch.log(torch.tensor(RATIOS))).requires_grad_(True)
    loss, metrics = clipped_policy_loss(
        logp_T,
        old_T,
        torch.tensor(ADVS),
        torch.ones(6),
        eps_low=0.2,
        eps_high=0.28,
        num_global_tokens=6,
    )
    loss.backward()
    assert loss.item() == pytest.approx(sum(PER_TOKEN) / 6, abs=1e-6)  # 0.52 / 6
    torch.testing.assert_close(logp_T.grad, torch.tensor(GRAD_PER_TOKEN) / 6, rtol=0, atol=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 6)
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 6)
    assert metrics["ratio_max"].item() == pytest.approx(1.5, abs=1e-6)
    assert metrics["num_tokens"].item() == 6


def test_clipped_objective_per_token_values():
    """One valid token at a time (the others masked, num_global_tokens 1): the loss is that
    token's own ``-min(rA, clip(r)A)`` and clip_frac says whether it clipped."""
    old_T = torch.full((6,), -1.0)
    logp_T = old_T + torch.log(torch.tensor(RATIOS))
    for t in range(6):
        loss, metrics = clipped_policy_loss(
            logp_T,
            old_T,
            torch.tensor(ADVS),
            torch.arange(6) == t,
            eps_low=0.2,
            eps_high=0.28,
            num_global_tokens=1,
        )
        assert loss.item() == pytest.approx(PER_TOKEN[t], abs=1e-6)
        assert metrics["clip_frac"].item() == float(CLIPPED[t])


def test_padding_is_ignored_and_gets_no_gradient():
    old_T = torch.zeros(4)
    logp_T = torch.tensor([0.0, 0.0, 5.0, -5.0], requires_grad=True)  # tokens 2, 3 are padding
    adv_T = torch.tensor([1.0, -2.0, 100.0, 100.0])
    loss, metrics = clipped_policy_loss(
        logp_T,
        old_T,
        adv_T,
        torch.tensor([1, 1, 0, 0]),
        eps_low=0.2,
        eps_high=0.28,
        num_global_tokens=2,
    )
    loss.backward()
    assert loss.item() == pytest.approx((-1.0 + 2.0) / 2)
    assert logp_T.grad[2:].tolist() == [0.0, 0.0]
    assert metrics["ratio_max"].item() == pytest.approx(1.0)


# padded [S=2, T=4]; per-token loss -A at ratio 1: seq 0 -> 1, 2, 3 (+ pad), seq 1 -> 4 (+ pads)
ADV_ST = torch.tensor([[-1.0, -2.0, -3.0, -100.0], [-4.0, -100.0, -100.0, -100.0]])
MASK_ST = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    ("loss_agg", "expected"),
    [("token_mean", (1 + 2 + 3 + 4) / 4), ("seq_mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2)],
)
def test_token_mean_vs_seq_mean_with_padding(loss_agg, expected):
    zeros = torch.zeros(2, 4)
    num_tokens, num_seqs = local_loss_normalisers(MASK_ST)
    assert (num_tokens, num_seqs) == (4, 2)
    kw = dict(eps_low=0.2, eps_high=0.28, loss_agg=loss_agg)
    full, _ = clipped_policy_loss(
        zeros, zeros, ADV_ST, MASK_ST, num_global_tokens=4, num_global_seqs=2, **kw
    )
    assert full.item() == pytest.approx(expected)  # token_mean 2.5, seq_mean 3.0
    # two micro-batches (one sequence each) with the global normalisers sum to the same loss
    parts = [
        clipped_policy_loss(
            zeros[s : s + 1],
            zeros[s : s + 1],
            ADV_ST[s : s + 1],
            MASK_ST[s : s + 1],
            num_global_tokens=4,
            num_global_seqs=2,
            **kw,
        )[0]
        for s in range(2)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(expected)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_all_masked_batch_gives_zero_loss_not_nan(loss_agg):
    """Every token masked (e.g. all responses truncated under ``overlong=mask``): the global
    counts are 0 and are clamped at 1, so the loss is 0 / 1 = 0 with a zero gradient."""
    logp_T = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    mask_T = torch.zeros(3)
    assert local_loss_normalisers(mask_T, torch.tensor([0, 0, 1])) == (0, 0)
    loss, metrics = clipped_policy_loss(
        logp_T,
        torch.full((3,), -1.5),
        torch.tensor([1.0, -1.0, 2.0]),
        mask_T,
        eps_low=0.2,
        eps_high=0.28,
        loss_agg=loss_agg,
        num_global_tokens=0,
        num_global_seqs=0,
        seq_ids=torch.tensor([0, 0, 1]),
    )
    loss.backward()
    assert loss.item() == 0.0
    assert logp_T.grad.tolist() == [0.0, 0.0, 0.0]
    assert metrics["num_tokens"].item() == 0.0 and metrics["clip_frac"].item() == 0.0


def test_aggregate_needs_its_normaliser():
    per_token_T, mask_T = torch.ones(4), torch.ones(4)
    with pytest.raises(ValueError, match="num_global_tokens"):
        aggregate(per_token_T, mask_T, loss_agg="token_mean")
    with pytest.raises(ValueError, match="num_global_seqs"):
        aggregate(per_token_T, mask_T, loss_agg="seq_mean", seq_ids=torch.zeros(4))
    with pytest.raises(ValueError, match="seq_ids"):
        aggregate(per_token_T, mask_T, loss_agg="seq_mean", num_global_seqs=1)
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(per_token_T, mask_T, loss_agg="sum", num_global_tokens=4)


def test_seq_mean_on_a_packed_row_matches_padded():
    per_token_T = torch.tensor([1.0, 2.0, 3.0, 9.0, 4.0, 7.0])
    mask_T = torch.tensor([1, 1, 1, 0, 1, 0])
    seq_ids_T = torch.tensor([0, 0, 0, 0, 1, 1])
    loss = aggregate(per_token_T, mask_T, loss_agg="seq_mean", num_global_seqs=2, seq_ids=seq_ids_T)
    assert loss.item() == pytest.approx(3.0)
    assert local_loss_normalisers(mask_T, seq_ids_T) == (4, 2)


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # d = ref - logp = -0.5
    assert kl_penalty(logp, ref, estimator="k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, estimator="k2").item() == pytest.approx(0.125)
    assert kl_penalty(logp, ref, estimator="k3").item() == pytest.approx(0.1065306597, abs=1e-7)
    assert kl_penalty(ref, ref, estimator="k3").item() == 0.0


def test_grpo_loss_adds_the_kl_term_only_when_asked():
    logp_T, old_T = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0])
    adv_T, mask_T = torch.tensor([1.0, -1.0]), torch.ones(2)
    ref_T = torch.tensor([-1.5, -2.0])
    loss0, m0 = grpo_loss(logp_T, old_T, adv_T, mask_T, cfg=GRPOConfig(), num_global_tokens=2)
    assert loss0.item() == pytest.approx(0.0) and "kl" not in m0
    cfg = GRPOConfig(kl_coef=0.5, kl_estimator="k3")
    loss, metrics = grpo_loss(
        logp_T, old_T, adv_T, mask_T, cfg=cfg, num_global_tokens=2, ref_logprobs=ref_T
    )
    assert loss.item() == pytest.approx(0.5 * 0.1065306597 / 2, abs=1e-7)
    assert metrics["kl"].item() == pytest.approx(0.1065306597 / 2, abs=1e-7)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp_T, old_T, adv_T, mask_T, cfg=cfg, num_global_tokens=2)


def test_overlong_penalty_hand_values():
    lengths = torch.tensor([50, 80, 90, 100, 120])
    penalty = overlong_penalty(lengths, max_new_tokens=100, buffer_tokens=20, factor=1.0)
    assert penalty.tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_shape_rewards_penalty_and_mask():
    rewards, lengths = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([10, 95, 100])
    truncated = torch.tensor([False, False, True])
    cfg = GRPOConfig(overlong="penalty", overlong_buffer_tokens=10, overlong_penalty_factor=0.5)
    shaped, keep, m = shape_rewards(rewards, lengths, truncated, cfg=cfg, max_new_tokens=100)
    assert shaped.tolist() == [1.0, 0.75, -0.5] and keep.all()
    assert m["num_truncated"] == 1 and m["num_masked"] == 0
    cfg = GRPOConfig(overlong="mask")
    shaped, keep, m = shape_rewards(rewards, lengths, truncated, cfg=cfg, max_new_tokens=100)
    assert shaped.tolist() == [1.0, 1.0, 0.0] and keep.tolist() == [True, True, False]
    assert m["num_masked"] == 1


def test_filter_groups_drops_all_equal_groups():
    rewards_BG = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.5, 1.5, 1.5]])
    keep_B, metrics = filter_groups(rewards_BG)
    assert keep_B.tolist() == [False, True, False, False]
    assert metrics == {"groups": 4, "groups_kept": 1, "groups_dropped": 3}


MIXED = [0.0, 1.0]
SAME = [1.0, 1.0]


def test_dynamic_sampler_refills_until_full():
    sampler = DynamicSampler(target_groups=3, max_rounds=3)
    rounds = [
        (["a", "b", "c", "d"], [SAME, MIXED, SAME, SAME]),
        (["e", "f", "g", "h"], [SAME, SAME, SAME, MIXED]),
        (["i", "j"], [MIXED, MIXED]),
    ]
    for items, rewards in rounds:
        assert not sampler.done
        sampler.add(items, torch.tensor(rewards))
    assert sampler.done and sampler.groups_needed == 0
    items, rewards_BG, metrics = sampler.take()
    assert items == ["b", "h", "i"]
    assert rewards_BG.tolist() == [MIXED, MIXED, MIXED]
    assert metrics == {
        "sampling_rounds": 3.0,
        "groups_sampled": 10.0,
        "groups_dropped": 6.0,
        "groups_kept": 3.0,
        "groups_surplus": 1.0,
        "batch_full": 1.0,
    }


def test_dynamic_sampler_every_group_filtered_is_bounded_and_reported():
    sampler = DynamicSampler(target_groups=2, max_rounds=2)
    while not sampler.done:
        sampler.add(["x", "y"], torch.tensor([SAME, SAME]))
    items, rewards_BG, metrics = sampler.take()
    assert items == [] and rewards_BG.numel() == 0
    assert metrics["sampling_rounds"] == 2.0 and metrics["groups_dropped"] == 4.0
    assert metrics["batch_full"] == 0.0 and metrics["groups_kept"] == 0.0


def test_dynamic_sampler_disabled_keeps_everything():
    sampler = DynamicSampler(target_groups=2, max_rounds=5, enabled=False)
    sampler.add(["x", "y"], torch.tensor([SAME, SAME]))
    assert sampler.done
    items, _, metrics = sampler.take()
    assert items == ["x", "y"] and metrics["groups_dropped"] == 0.0


def test_dynamic_sampler_accuracy_filter_drops_format_only_groups():
    """``grpo.filter_on=accuracy``: a group whose rewards differ only through the format
    reward (every answer wrong) is dropped; the kept group keeps its shaped rewards."""
    sampler = DynamicSampler(target_groups=2, max_rounds=1)
    rewards_BG = torch.tensor([[0.5, 0.0, 0.5], [1.5, 0.5, 0.0], [1.5, 1.5, 1.0]])
    accuracy_BG = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    metrics = sampler.add(["format-only", "mixed", "all-right"], rewards_BG, filter_BG=accuracy_BG)
    assert metrics["groups_kept"] == 1 and metrics["groups_dropped"] == 2
    items, kept_BG, _ = sampler.take()
    assert items == ["mixed"] and kept_BG.tolist() == [[1.5, 0.5, 0.0]]
    with pytest.raises(ValueError, match="filter values"):
        sampler.add(["x"], torch.zeros(1, 3), filter_BG=torch.zeros(1, 2))
