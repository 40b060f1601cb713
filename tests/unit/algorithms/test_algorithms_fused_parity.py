"""algorithms.grpo on reference log-probs == the fused kernel's GRPO loss (loss and grads)."""

from __future__ import annotations

import pytest
import torch
from megatron_metis.kernels.fused_logprob import fused_grpo_loss, linear_logprob_ref

from megatron_metis.algorithms.grpo import clipped_policy_loss


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_pure_loss_matches_fused_grpo_loss(loss_agg):
    gen = torch.Generator().manual_seed(0)
    T, H, V = 23, 16, 37
    hidden = torch.randn(T, H, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(V, H, generator=gen).mul(0.5)
    targets = torch.randint(0, V, (T,), generator=gen)
    seq_ids = torch.tensor([0] * 9 + [1] * 6 + [2] * 8)
    mask = (torch.rand(T, generator=gen) > 0.2).float()
    adv = torch.randn(3, generator=gen)[seq_ids]
    with torch.no_grad():  # old log-probs off by up to +-0.6: both sides of the clip range
        old = linear_logprob_ref(hidden, weight, targets)[0]
        old = old + (torch.rand(T, generator=gen) - 0.5) * 1.2
    norms = dict(num_global_tokens=float(mask.sum()) + 5.0, num_global_seqs=4.0)

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss_f, metrics_f = fused_grpo_loss(
        h1,
        w1,
        targets,
        old,
        adv,
        mask,
        clip_low=0.2,
        clip_high=0.28,
        loss_agg=loss_agg,
        seq_ids_T=seq_ids,
        impl="torch",
        **norms,
    )
    loss_f.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logprobs = linear_logprob_ref(h2, w2, targets)[0]
    loss_p, metrics_p = clipped_policy_loss(
        logprobs,
        old,
        adv,
        mask,
        eps_low=0.2,
        eps_high=0.28,
        loss_agg=loss_agg,
        seq_ids=seq_ids,
        **norms,
    )
    loss_p.backward()

    assert 0 < metrics_p["clip_frac"].item() < 1  # the case exercises clipping
    torch.testing.assert_close(loss_p, loss_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)
    for key in ("clip_frac", "clip_frac_high", "clip_frac_low", "ratio_mean", "num_tokens"):
        torch.testing.assert_close(metrics_p[key], metrics_f[key], rtol=1e-5, atol=1e-6)
