"""Qwen2.5-VL on the engine against transformers: M-RoPE ids, logits at TP=1/TP=2/PP=2,
gradients TP=2 vs TP=1 (tower trainable and frozen), conversion round trips, generation.

One spawn per layout computes everything for that layout (module-scoped fixture); the tests
then only compare.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_qwen2_5_vl
from vl_batches import build_batches, hf_logits
from vl_worker import FREEZE, layout_worker

from megatron_metis.checkpoint.hf_io import HFCheckpointReader
from megatron_metis.models.rope_index import mrope_position_ids
from megatron_metis.parallel import spawn

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
TOL = 1e-4
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("tiny_vl")
    model, processor = make_tiny_qwen2_5_vl(hf_dir)
    batches = build_batches(processor)
    refs = {name: hf_logits(model, batch) for name, batch in batches.items()}
    return {"dir": str(hf_dir), "model": model, "batches": batches, "refs": refs}


@pytest.fixture(scope="module")
def layouts(tiny, tmp_path_factory):
    """Results per (tp, pp); TP=2 saves a dist checkpoint that PP=2 converts back to HF."""
    work = tmp_path_factory.mktemp("vl_ckpt")
    convert = {
        (1, 1): {},
        (2, 1): {"save_dist": str(work / "dist"), "alt_hf_dir": _transformers5_layout(tiny, work)},
        (1, 2): {"load_dist": str(work / "dist"), "hf_out": str(work / "hf_back")},
    }
    results = {}
    for tp, pp in LAYOUTS:
        outs = spawn(
            layout_worker,
            tp * pp,
            tiny["dir"],
            tp,
            pp,
            tiny["batches"],
            convert[tp, pp],
            timeout_s=300,
        )
        results[tp, pp] = {
            "logits": next(o["logits"] for o in outs if o["logits"]["mixed"] is not None),
            "rank0": outs[0],
        }
    results["hf_back"] = work / "hf_back"
    return results


def _transformers5_layout(tiny, work: Path) -> str:
    """A copy of the checkpoint under transformers 5's in-memory names (model.language_model.*,
    model.visual.*), which the converter must read too."""
    out = work / "t5_layout"
    shutil.copytree(tiny["dir"], out)
    renamed = {
        re.sub(r"^visual\.", "model.visual.", re.sub(r"^model\.", "model.language_model.", k)): v
        for k, v in load_file(str(out / "model.safetensors")).items()
    }
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_reads_transformers5_layout(tiny, layouts):
    """Loaded at TP=2 from model.language_model.* / model.visual.*, exported in release names."""
    original = load_file(str(Path(tiny["dir"]) / "model.safetensors"))
    exported = layouts[2, 1]["rank0"]["alt_exported"]
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())


def test_rope_index_matches_transformers(tiny):
    hf_model = tiny["model"].model
    for name, batch in tiny["batches"].items():
        for mask in (batch.attention_mask_BS, None):
            if mask is None and name == "mixed":
                continue  # padded rows need the mask
            expected, deltas = hf_model.get_rope_index(
                batch.input_ids_BS,
                mm_token_type_ids=batch.mm_token_type_ids_BS,
                image_grid_thw=batch.image_grid_thw_N3,
                attention_mask=mask,
            )
            got, got_deltas = mrope_position_ids(
                batch.input_ids_BS,
                batch.image_grid_thw_N3,
                image_token_id=tiny["model"].config.image_token_id,
                spatial_merge_size=2,
                attention_mask_BS=mask,
            )
            assert torch.equal(got, expected), name
            assert torch.equal(got_deltas, deltas), name


def test_rope_index_left_padding_matches_transformers(tiny):
    batch = tiny["batches"]["mixed"]
    ids, mask, types = batch.input_ids_BS, batch.attention_mask_BS, batch.mm_token_type_ids_BS
    lengths = mask.sum(-1)
    shift = lambda t: torch.stack(  # noqa: E731 - right padding -> left padding
        [torch.roll(row, int(row.shape[0] - n)) for row, n in zip(t, lengths, strict=True)]
    )
    expected, _ = tiny["model"].model.get_rope_index(
        shift(ids),
        mm_token_type_ids=shift(types),
        image_grid_thw=batch.image_grid_thw_N3,
        attention_mask=shift(mask),
    )
    got, _ = mrope_position_ids(
        shift(ids),
        batch.image_grid_thw_N3,
        image_token_id=tiny["model"].config.image_token_id,
        spatial_merge_size=2,
        attention_mask_BS=shift(mask),
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("batch", ["mixed", "text"])
def test_logits_match_transformers(tiny, layouts, tp, pp, batch):
    """mixed = image+text, two images+text, text-only, image+text in one batch."""
    real = tiny["batches"][batch].attention_mask_BS.bool()
    got = layouts[tp, pp]["logits"][batch]
    diff = (got - tiny["refs"][batch])[real].abs().max().item()
    print(f"tp={tp} pp={pp} {batch}: max abs logit diff {diff:.3e}")
    assert diff <= TOL


def test_logits_per_sample_kind(tiny, layouts):
    """Each kind of sample (one image, two images, text only) matches on its own rows."""
    batch = tiny["batches"]["mixed"]
    for row, kind in enumerate(batch.sample_ids):
        real = batch.attention_mask_BS[row].bool()
        for tp, pp in LAYOUTS:
            got = layouts[tp, pp]["logits"]["mixed"][row][real]
            assert (got - tiny["refs"]["mixed"][row][real]).abs().max() <= TOL, (kind, tp, pp)


@pytest.mark.parametrize("tag", list(FREEZE))
def test_gradients_tp2_match_tp1(layouts, tag):
    g1 = layouts[1, 1]["rank0"]["grads"][tag]
    g2 = layouts[2, 1]["rank0"]["grads"][tag]
    assert set(g1) == set(g2)
    scale = max(g.abs().max().item() for g in g1.values() if not g.isnan().any())
    for name in g1:
        if g1[name].isnan().all():  # frozen: no gradient at either layout
            assert g2[name].isnan().all(), name
            continue
        diff = (g1[name] - g2[name]).abs().max().item()
        assert diff <= 1e-6 * scale, (name, diff, scale)


def test_freeze_switches(layouts):
    out = layouts[1, 1]["rank0"]
    trainable = out["requires_grad"]["trainable"]
    assert all(trainable.values())
    frozen_tower = out["requires_grad"]["frozen_tower"]
    assert all(v == n.startswith("merger.") for n, v in frozen_tower.items())
    assert not any(out["requires_grad"]["frozen_all"].values())
    grads = out["grads"]
    for tag, frozen_prefixes in {
        "trainable": (),
        "frozen_tower": ("visual.patch_embed", "visual.blocks"),
        "frozen_all": ("visual.",),
    }.items():
        for name, grad in grads[tag].items():
            assert grad.isnan().all() == name.startswith(frozen_prefixes or ("\0",)), (tag, name)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_export_bit_exact(tiny, layouts, tp, pp):
    original = load_file(str(Path(tiny["dir"]) / "model.safetensors"))
    exported = layouts[tp, pp]["rank0"]["exported"]
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


def test_dist_checkpoint_round_trip_bit_exact_and_release_layout(tiny, layouts):
    """HF -> dist checkpoint at TP=2 -> HF at PP=2: every tensor bit-exact, release names."""
    original = load_file(str(Path(tiny["dir"]) / "model.safetensors"))
    reader = HFCheckpointReader(layouts["hf_back"])
    assert set(reader.names()) == set(original)
    assert any(n.startswith("visual.") for n in reader.names())
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in reader.names())
    for name, tensor in original.items():
        assert torch.equal(reader.read(name), tensor), name


def test_converted_back_generates_like_original(tiny, layouts):
    from transformers import Qwen2_5_VLForConditionalGeneration

    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(layouts["hf_back"]).eval()
    batch = tiny["batches"]["mixed"]
    cfg = tiny["model"].config
    suppress = [
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
    ]
    row = slice(0, 1)  # the one-image sample; no padding
    kwargs = {
        "input_ids": batch.input_ids_BS[row],
        "attention_mask": batch.attention_mask_BS[row],
        "pixel_values": batch.pixel_values_PC[: int(batch.image_grid_thw_N3[0].prod())],
        "image_grid_thw": batch.image_grid_thw_N3[:1],
        "mm_token_type_ids": batch.mm_token_type_ids_BS[row],
        "max_new_tokens": 8,
        "do_sample": False,
        "suppress_tokens": suppress,
    }
    expected = tiny["model"].generate(**kwargs)
    got = back.generate(**kwargs)
    assert got.shape[1] > batch.input_ids_BS.shape[1]
    assert torch.equal(got, expected)


def test_verify_conversion_tool(tiny):
    cmd = [
        sys.executable,
        str(REPO / "tools" / "verify_conversion.py"),
        "--hf-dir",
        tiny["dir"],
        "--tp",
        "1",
        "--pp",
        "2",
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "image_text: max abs logit diff" in ok.stdout and "OK" in ok.stdout


def test_verify_conversion_tool_fails_a_checkpoint_with_a_corrupted_tensor(tiny, tmp_path):
    """A NaN in one vision tensor spoils the image batch on both sides (the engine and
    transformers read the same file), while the text-only batch stays finite: the verdict must be
    FAIL, whichever batch is checked first."""
    bad_dir = tmp_path / "corrupted"
    shutil.copytree(tiny["dir"], bad_dir)
    (weights_file,) = bad_dir.glob("*.safetensors")
    tensors = load_file(weights_file)
    name = next(k for k in sorted(tensors) if "visual" in k and "patch_embed" in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, weights_file, metadata={"format": "pt"})
    cmd = [sys.executable, str(REPO / "tools" / "verify_conversion.py"), "--hf-dir", str(bad_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, (out.stdout, out.stderr[-2000:])
    assert re.search(r"image_text: max abs logit diff nan", out.stdout), out.stdout
    assert re.search(r"^text: max abs logit diff \d", out.stdout, re.M), out.stdout
    assert "FAIL" in out.stdout and "OK" not in out.stdout
