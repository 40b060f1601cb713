"""The Qwen2 language model on the engine against transformers, at TP=1, TP=2, PP=2, TP2xPP2,
and with context parallelism CP=2 alone, with TP=2 and with PP=2.

One spawned job per layout computes everything (logits, gradients, exported weights, dist
checkpoints) for a tied and an untied tiny model; the tests assert on the collected results.
"""

from __future__ import annotations

import pytest
import torch
from engine_worker import BATCH, SEQ, batch_ids, layout_worker, logit_weights
from safetensors.torch import load_file
from tiny_models import make_tiny_qwen2

from megatron_metis.parallel import spawn

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2)]
"""(TP, PP, CP)"""
TAGS = ("untied", "tied")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models = {}
    for tag in TAGS:
        model = make_tiny_qwen2(root / tag, tie_word_embeddings=tag == "tied")
        ids = batch_ids(model.config.vocab_size)
        logits = model(ids).logits
        # Reference gradient of the same loss the engine uses: sum(logits * W) / 1.
        w = logit_weights(model.config.vocab_size, model.config.vocab_size)
        model.zero_grad()
        (logits * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        files = load_file(str(root / tag / "model.safetensors"))
        models[tag] = {
            "dir": str(root / tag),
            "logits": logits.detach(),
            "grads": grads,
            "files": files,
        }
    return models


@pytest.fixture(scope="module")
def results(hf_models, tmp_path_factory):
    """Run the layouts in an order that also moves dist checkpoints across layouts:
    TP=2 saves -> TP=1 loads it and saves -> TP2xPP2 and TP2xCP2 load the TP=1 one;
    CP=2 saves -> PP2xCP2 loads it."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    dirs = {tag: m["dir"] for tag, m in hf_models.items()}
    plan = {
        (2, 1, 1): (str(ckpt / "tp2"), None),
        (1, 1, 1): (str(ckpt / "tp1"), str(ckpt / "tp2")),
        (1, 2, 1): (None, None),
        (2, 2, 1): (None, str(ckpt / "tp1")),
        (1, 1, 2): (str(ckpt / "cp2"), None),
        (2, 1, 2): (None, str(ckpt / "tp1")),
        (1, 2, 2): (None, str(ckpt / "cp2")),
    }
    out = {}
    for (tp, pp, cp), (save_to, load_from) in plan.items():
        ranks = spawn(
            layout_worker, tp * pp * cp, dirs, tp, pp, save_to, load_from, cp, timeout_s=240
        )
        out[(tp, pp, cp)] = ranks
    return out


def _last_stage(ranks, tag, key):
    values = [r[tag][key] for r in ranks if r[tag].get(key) is not None]
    assert values, f"no rank returned {key}"
    return values[0]


@pytest.mark.parametrize("tp,pp,cp", LAYOUTS)
@pytest.mark.parametrize("tag", TAGS)
def test_logits_match_transformers(results, hf_models, tag, tp, pp, cp):
    logits = _last_stage(results[(tp, pp, cp)], tag, "logits")
    assert logits.shape == (BATCH, SEQ, 131)
    diff = (logits - hf_models[tag]["logits"]).abs().max().item()
    assert diff <= 1e-5, f"{tag} TP={tp} PP={pp} CP={cp}: max |logits - HF| = {diff:.3g}"


@pytest.mark.parametrize("tp,pp,cp", LAYOUTS)
@pytest.mark.parametrize("tag", TAGS)
def test_hf_round_trip_is_bit_exact(results, hf_models, tag, tp, pp, cp):
    """HF -> Megatron (TP/PP shards, vocab 131 padded) -> HF gives back every tensor exactly."""
    original = hf_models[tag]["files"]
    for rank_result in results[(tp, pp, cp)]:
        exported = rank_result[tag]["exported"]
        assert set(exported) == set(original)
        for name, tensor in original.items():
            assert torch.equal(exported[name], tensor), f"{name} differs after the round trip"


@pytest.mark.parametrize("tp,pp,cp", LAYOUTS)
def test_gradients_match_transformers(results, hf_models, tp, pp, cp):
    """Engine gradients (gathered to HF names) equal transformers' and so equal TP=1's.

    Tied embeddings are checked at PP=1, where one parameter receives both uses; at PP>1 the
    two copies are summed by the optimizer's grad sync, which is the trainer's job.
    """
    for tag in TAGS:
        grads = results[(tp, pp, cp)][0][tag]["grads"]
        for name, ref in hf_models[tag]["grads"].items():
            if tag == "tied" and pp > 1 and name == "model.embed_tokens.weight":
                continue
            diff = (grads[name] - ref).abs().max().item()
            scale = ref.abs().max().item() + 1e-6
            assert diff <= 1e-4 * scale + 1e-5, f"{tag} TP={tp} PP={pp} CP={cp} {name}: {diff:.3g}"


def test_tp2_pp2_and_cp2_gradients_equal_tp1(results):
    base = results[(1, 1, 1)][0]["untied"]["grads"]
    for layout in LAYOUTS[1:]:
        other = results[layout][0]["untied"]["grads"]
        for name in base:
            assert torch.allclose(other[name], base[name], atol=1e-5, rtol=1e-4), (layout, name)


@pytest.mark.parametrize("tag", TAGS)
def test_dist_checkpoint_moves_between_layouts(results, tag):
    """Saved at TP=2, loaded at TP=1 (and saved at TP=1, loaded at TP=2 x PP=2 and at TP=2 x
    CP=2; saved at CP=2, loaded at PP=2 x CP=2): the reloaded model's logits are identical to
    those of the same layout loaded from HF."""
    for layout in [(1, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2)]:
        ranks = results[layout]
        reloaded = _last_stage(ranks, tag, "reloaded_logits")
        direct = _last_stage(ranks, tag, "logits")
        assert torch.equal(reloaded, direct), f"{tag} at {layout}"
