"""The SDPA core attention of the local layers computes what Megatron's own
``DotProductAttention`` computes: same outputs and gradients under every kind of mask the
trainer builds (causal default, block-causal packed rows, left padding with fully masked rows),
with grouped-query attention."""

from __future__ import annotations

import pytest
import torch
from attention_worker import compare_worker

from megatron_metis.parallel import spawn


@pytest.fixture(scope="module")
def results():
    return spawn(compare_worker, 1, timeout_s=120)[0]


@pytest.mark.parametrize("mask", ["causal", "packed", "left_padded"])
def test_sdpa_attention_matches_megatron_dot_product_attention(results, mask):
    names = ("output", "query grad", "key grad", "value grad")
    ref, got = results[mask]["megatron"], results[mask]["sdpa"]
    for name, r, g in zip(names, ref, got, strict=True):
        assert g.shape == r.shape, name
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=f"{mask}: {name}")
    assert torch.isfinite(got[0]).all()


def test_the_masks_exercise_what_they_claim(results):
    # Fully masked query rows (3 + 6 left-padding positions) exist only in the left-padded case;
    # there Megatron gives them the mean of the values, which the SDPA module must reproduce.
    assert results["left_padded"]["blind_rows"] == 3 + 6
    assert results["causal"]["blind_rows"] == results["packed"]["blind_rows"] == 0
    assert not torch.equal(results["causal"]["megatron"][0], results["packed"]["megatron"][0])


def test_config_the_sdpa_attention_does_not_implement_is_refused(results):
    assert results["unsupported"] is not None
    assert "apply_query_key_layer_scaling" in results["unsupported"]
