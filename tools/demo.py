#!/usr/bin/env python3
"""`make demo` until the Metis-RISE pipeline lands: the engine on the tiny embedded default.

1. writes the synthetic multimodal reasoning tasks and validates them (``metis data``);
2. builds a tiny Qwen2 with the local tokenizer (transformers, random weights);
3. converts it HF -> Megatron at TP=2 and back to HF at PP=2 (the conversion tools);
4. checks the engine's logits against transformers and the round trip bit for bit.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from megatron_metis.cli.convert_cmd import main_hf_to_megatron, main_megatron_to_hf
from megatron_metis.config import DataConfig
from megatron_metis.data import check_files
from megatron_metis.data.synth.build import write_synthetic_dataset
from megatron_metis.data.tokenizer import build_tiny_tokenizer


def _tiny_model(out: Path) -> Qwen2ForCausalLM:
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/demo")
    parser.add_argument("--n", type=int, default=300, help="synthetic problems")
    args = parser.parse_args()
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()

    summary = write_synthetic_dataset(out / "data", n=args.n, seed=0)
    data_cfg = DataConfig(image_min_pixels=56 * 56, image_max_pixels=112 * 112)
    files = [str(p) for p in summary.files.values()]
    report = check_files(files, data_cfg, build_tiny_tokenizer())
    print(f"[1] synthetic tasks: {summary.counts}; bad rows: {len(report.bad_rows)}")

    model = _tiny_model(out / "hf")
    print(f"[2] tiny Qwen2: {sum(p.numel() for p in model.parameters()):,} parameters")

    if main_hf_to_megatron(
        ["--hf-dir", str(out / "hf"), "--out-dir", str(out / "mcore"), "--tp", "2"]
    ):
        return 1
    if main_megatron_to_hf(
        ["--ckpt-dir", str(out / "mcore"), "--out-dir", str(out / "hf_back"), "--pp", "2"]
    ):
        return 1
    before = load_file(str(out / "hf" / "model.safetensors"))
    after = {}
    for shard in (out / "hf_back").glob("*.safetensors"):
        after.update(load_file(str(shard)))
    exact = set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    print(f"[3] HF -> Megatron (TP=2) -> HF (PP=2): {len(before)} tensors, bit-exact: {exact}")

    back = AutoModelForCausalLM.from_pretrained(out / "hf_back").eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        same = torch.equal(back(ids).logits, model(ids).logits)
    print(f"[4] converted-back model loads in transformers, identical logits: {same}")
    print(f"done in {time.time() - t0:.0f}s; outputs under {out}/")
    return 0 if exact and same and not report.bad_rows else 1


if __name__ == "__main__":
    sys.exit(main())
