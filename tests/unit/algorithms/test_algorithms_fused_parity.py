"""algorithms.grpo_loss over the fused kernel's log-probs == over the reference log-probs.

The trainer's one GRPO objective (clipped loss, optional KL term, token_mean | seq_mean) on
top of ``fused_linear_logprob`` (chunked PyTorch backend) against the same objective on top of
``linear_logprob_ref``, which materialises the logits: loss, metrics, and the gradients of the
hidden states and of the output weight.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from megatron_metis.kernels.fused_logprob import fused_linear_logprob, linear_logprob_ref

from megatron_metis.algorithms.grpo import grpo_loss
from megatron_metis.config.rl import GRPOConfig


@pytest.mark.parametrize("kl_coef", [0.0, 0.1], ids=["no-kl", "kl"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_grpo_loss_over_fused_logprobs_matches_reference(loss_agg, kl_coef):
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
        ref = old + (torch.rand(T, generator=gen) - 0.5) * 0.4
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28, loss_agg=loss_agg, kl_coef=kl_coef)
    norms = dict(num_global_tokens=float(mask.sum()) + 5.0, num_global_seqs=4.0)

    def run(logprob_fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logprobs = logprob_fn(h, w, targets)[0]
        loss, metrics = grpo_loss(
            logprobs, old, adv, mask, cfg=cfg, seq_ids=seq_ids, ref_logprobs=ref, **norms
        )
        loss.backward()
        return loss, metrics, h.grad, w.grad

    loss_f, metrics_f, grad_h_f, grad_w_f = run(partial(fused_linear_logprob, impl="torch"))
    loss_p, metrics_p, grad_h_p, grad_w_p = run(linear_logprob_ref)

    assert 0 < metrics_p["clip_frac"].item() < 1  # the case exercises clipping
    torch.testing.assert_close(loss_p, loss_f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h_p, grad_h_f, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_w_p, grad_w_f, rtol=1e-4, atol=1e-6)
    keys = ["clip_frac", "clip_frac_high", "clip_frac_low", "ratio_mean", "num_tokens", "pg_loss"]
    assert ("kl" in metrics_f) == (kl_coef > 0)
    for key in keys + (["kl"] if kl_coef > 0 else []):
        torch.testing.assert_close(metrics_p[key], metrics_f[key], rtol=1e-5, atol=1e-6)
