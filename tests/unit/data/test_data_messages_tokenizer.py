"""Tiny tokenizer, chat messages and prompt-length counting."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from megatron_metis.config.data import METIS_SYSTEM_PROMPT
from megatron_metis.data import Problem, build_messages, count_prompt_tokens, image_token_count
from megatron_metis.data.messages import render_prompt, smart_resize
from megatron_metis.data.tokenizer import (
    QWEN2_5_SPECIAL_TOKENS,
    build_tiny_tokenizer,
    save_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_tokenizer_layout(tok) -> None:
    ids = tok.convert_tokens_to_ids(list(QWEN2_5_SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + 22))  # Qwen2.5 order, after the BPE vocab
    assert ids[-1] == len(tok) - 1 and 300 < len(tok) <= 2048
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.image_token == "<|image_pad|>"
    text = "<think> 12 + 7 = 19 </think><answer> $\\boxed{19}$ </answer>"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert "1" in tok.convert_ids_to_tokens(tok("12")["input_ids"])  # digits split


def test_save_and_reload(tok, tmp_path: Path) -> None:
    save_tiny_tokenizer(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "Compute 2 + 3."}]
    assert render_prompt(again, msgs) == render_prompt(tok, msgs)
    assert again("x^2 + 1")["input_ids"] == tok("x^2 + 1")["input_ids"]


def test_messages_and_template(tok) -> None:
    text_only = Problem(id="t", question="Compute 2 + 3.", answer="5")
    msgs = build_messages(text_only, system_prompt=METIS_SYSTEM_PROMPT)
    assert msgs == [
        {"role": "system", "content": METIS_SYSTEM_PROMPT},
        {"role": "user", "content": "Compute 2 + 3."},
    ]
    mc = Problem(id="m", question="Which?", answer="A", images=("a.png",), choices=("x", "y"))
    msgs = build_messages(mc, system_prompt="")
    assert msgs[0]["role"] == "user"
    assert msgs[0]["content"][0] == {"type": "image", "image": "a.png"}
    assert msgs[0]["content"][1]["text"] == "Which?\nOptions:\nA. x\nB. y"
    prompt = render_prompt(tok, build_messages(mc, system_prompt="S"))
    assert prompt == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Which?\nOptions:\nA. x\nB. y<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("size", [(56, 56), (84, 112), (100, 80), (640, 480), (30, 2000)])
def test_smart_resize_matches_transformers(size: tuple[int, int]) -> None:
    reference = pytest.importorskip(
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
    ).smart_resize
    w, h = size
    ours = smart_resize(h, w, min_pixels=56 * 56, max_pixels=112 * 112)
    assert ours == tuple(reference(h, w, factor=28, min_pixels=56 * 56, max_pixels=112 * 112))


def test_prompt_token_count_includes_image_tokens(tok, tmp_path: Path) -> None:
    Image.new("RGB", (84, 84)).save(tmp_path / "a.png")
    problem = Problem(id="i", question="How many?", answer="1", images=(str(tmp_path / "a.png"),))
    n = count_prompt_tokens(
        tok, problem, system_prompt="S", image_sizes=[(84, 84)], min_pixels=784, max_pixels=12544
    )
    per_image = image_token_count(84, 84, min_pixels=784, max_pixels=12544)
    assert per_image == 9  # 84x84 -> 6x6 patches -> 3x3 merged
    text = render_prompt(tok, build_messages(problem, system_prompt="S"))
    assert n == len(tok(text)["input_ids"]) + per_image - 1
