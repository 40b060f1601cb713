"""The decoder layer specs (``models.specs``) are Megatron-Core's own GPT layer specs, filled
from a backend provider: Transformer Engine's on GPUs, the local layers with SDPA attention
elsewhere. Specs are plain dataclasses of classes, so they compare without building a layer.
"""

from __future__ import annotations

import dataclasses

import pytest
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_metis.models.local_attention import (
    ContextParallelSdpaAttention,
    SdpaDotProductAttention,
    SdpaSpecProvider,
)
from megatron_metis.models.specs import qwen2_layer_spec, spec_provider


def _core_attention(spec):
    return spec.submodules.self_attention.submodules.core_attention


def _with_core_attention(spec, cls: type):
    """A copy of a layer spec with another core attention (the spec itself is left alone)."""
    attention = spec.submodules.self_attention
    inner = dataclasses.replace(attention.submodules, core_attention=cls)
    submodules = dataclasses.replace(
        spec.submodules, self_attention=dataclasses.replace(attention, submodules=inner)
    )
    return dataclasses.replace(spec, submodules=submodules)


def test_local_provider_gives_megatrons_local_rmsnorm_spec():
    megatron = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    assert qwen2_layer_spec(LocalSpecProvider()) == megatron
    assert _core_attention(megatron) is DotProductAttention


@pytest.mark.parametrize(
    "context_parallel,cls", [(False, SdpaDotProductAttention), (True, ContextParallelSdpaAttention)]
)
def test_cpu_spec_is_the_local_spec_with_sdpa_attention(context_parallel, cls):
    provider = spec_provider(False, context_parallel=context_parallel)
    assert isinstance(provider, SdpaSpecProvider)
    spec = qwen2_layer_spec(provider)
    assert _core_attention(spec) is cls
    megatron = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    assert spec == _with_core_attention(megatron, cls)
    assert spec != megatron  # the comparison sees the core attention


def test_te_provider_gives_megatrons_transformer_engine_spec(monkeypatch):
    """Without Transformer Engine (a CPU box) its layer classes are placeholders, and Megatron's
    TE spec function misses ``TESpecProvider`` (imported only when TE imports) and a TE version
    (asked for the Q/K norm, which a Qwen2 layer does not use): the test supplies both, so the
    comparison runs here too; with TE it runs untouched."""
    from megatron.core.extensions import transformer_engine_spec_provider as te_provider
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    if not gpt_layer_specs.HAVE_TE:
        monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TESpecProvider, raising=False)
        monkeypatch.setattr(te_provider, "is_te_min_version", lambda *args, **kwargs: True)
    provider = spec_provider(True)
    assert isinstance(provider, TESpecProvider)
    spec = qwen2_layer_spec(provider)
    assert spec == gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    assert spec != qwen2_layer_spec(LocalSpecProvider())
