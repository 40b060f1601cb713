"""Qwen2.5-VL input processing: pixel bounds, system prompt, mixed batches, named errors."""

from __future__ import annotations

import pytest
from vl_batches import _png

from megatron_metis.data.schema import Problem
from megatron_metis.data.vl_inputs import (
    VLInputError,
    VLPrompt,
    build_vl_processor,
    encode_problems,
    encode_prompts,
)

PAD = "<|vision_start|><|image_pad|><|vision_end|>"


def test_min_max_pixels_bound_the_grid(tiny_tokenizer):
    image = _png((640, 480), 0)
    for min_px, max_px, expected in (
        (56 * 56, 112 * 112, [1, 6, 8]),
        (128 * 28 * 28, 16384 * 28 * 28, [1, 34, 46]),
    ):
        proc = build_vl_processor(tiny_tokenizer, min_pixels=min_px, max_pixels=max_px)
        batch = encode_prompts(proc, [VLPrompt(sample_id="a", text=PAD, images=[image])])
        assert batch.image_grid_thw_N3.tolist() == [expected]
        image_pad = tiny_tokenizer.convert_tokens_to_ids("<|image_pad|>")
        n_pad = int((batch.input_ids_BS == image_pad).sum())
        assert n_pad == expected[1] * expected[2] // 4
    small = encode_prompts(
        build_vl_processor(tiny_tokenizer, min_pixels=128 * 28 * 28, max_pixels=16384 * 28 * 28),
        [VLPrompt(sample_id="s", text=PAD, images=[_png((30, 20), 1)])],
    )
    t, h, w = small.image_grid_thw_N3[0].tolist()
    assert h * w * 14 * 14 >= 128 * 28 * 28


def test_mixed_batch_with_system_prompt(tiny_tokenizer):
    proc = build_vl_processor(tiny_tokenizer, min_pixels=56 * 56, max_pixels=112 * 112)
    problems = [
        Problem(id="img", question="How many?", answer="2", images=(_png((100, 80), 2),)),
        Problem(id="txt", question="Compute 3 + 4.", answer="7"),
    ]
    batch = encode_problems(proc, problems, system_prompt="SYSTEM PROMPT")
    assert batch.sample_ids == ("img", "txt")
    assert batch.image_grid_thw_N3.shape == (1, 3)
    assert batch.pixel_values_PC.shape == (48, 1176)
    for row in range(2):
        text = tiny_tokenizer.decode(batch.input_ids_BS[row][batch.attention_mask_BS[row].bool()])
        assert text.startswith("<|im_start|>system\nSYSTEM PROMPT<|im_end|>")
        assert text.endswith("<|im_start|>assistant\n")
    assert batch.attention_mask_BS[1, 0] == 0  # left padding for generation prompts


def test_pad_count_mismatch_names_the_sample(tiny_tokenizer):
    proc = build_vl_processor(tiny_tokenizer, min_pixels=56 * 56, max_pixels=112 * 112)
    ok = VLPrompt(sample_id="fine", text="hello")
    bad = VLPrompt(sample_id="q-17", text=PAD + PAD, images=[_png((60, 60), 3)])
    with pytest.raises(VLInputError, match=r"sample 'q-17'.*2 <\|image_pad\|> placeholders but 1"):
        encode_prompts(proc, [ok, bad])


def test_unreadable_image_names_the_sample(tiny_tokenizer, tmp_path):
    proc = build_vl_processor(tiny_tokenizer, min_pixels=56 * 56, max_pixels=112 * 112)
    broken = tmp_path / "broken.png"
    broken.write_bytes(_png((60, 60), 4)[:40])
    for source in (str(broken), str(tmp_path / "missing.png"), b"not an image"):
        with pytest.raises(VLInputError, match=r"sample 'q-3': image 0 .*unreadable"):
            encode_prompts(proc, [VLPrompt(sample_id="q-3", text=PAD, images=[source])])


def test_bad_pixel_bounds(tiny_tokenizer):
    with pytest.raises(ValueError, match="min_pixels"):
        build_vl_processor(tiny_tokenizer, min_pixels=100, max_pixels=10)
