"""The child-process body of the vLLM stage tests (vLLM's CPU worker changes the threads of the
process it runs in, so it never runs inside the pytest process)."""

from __future__ import annotations

import json
from pathlib import Path

VLLM_CPU = "{enforce_eager: true, kv_cache_memory_bytes: 268435456, max_model_len: 1024}"


def eval_and_triage(root: str) -> dict:
    """Greedy ``metis eval`` with the HF engine and with vLLM, then ``metis triage`` with vLLM,
    in one process (each stage's engine is closed before the next starts)."""
    from tiny_models import perturb_norms, spread_matrices
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_metis.config import load_config
    from megatron_metis.data.synth import write_synthetic_dataset
    from megatron_metis.models.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS, build_tiny_qwen2_5_vl
    from megatron_metis.stages.steps import eval_step, triage_step

    base = Path(root)
    hf = build_tiny_qwen2_5_vl(base / "hf", hidden_size=128, num_layers=2, seed=3)
    # spread weights: the default init's near-uniform logits make greedy decoding a coin toss
    # between near-tied tokens, which float32 rounding decides differently in each engine
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf)
    spread_matrices(perturb_norms(model), std=0.15).save_pretrained(hf)
    write_synthetic_dataset(base / "data", n=30, seed=0)
    common = [
        f"data.test_files=[{base}/data/test.jsonl]",
        f"data.train_files=[{base}/data/train.jsonl]",
        f"data.image_min_pixels={TINY_MIN_PIXELS}",
        f"data.image_max_pixels={TINY_MAX_PIXELS}",
        "rollout.dtype=float32",
        "rollout.max_new_tokens=24",
        "rewards.num_workers=0",
        "eval.mode=greedy",
        "triage.num_samples=4",
        "triage.prompts_per_batch=8",
    ]
    vllm = ["rollout.backend=vllm", "rollout.verify_weights=logprobs"]
    vllm.append(f"rollout.vllm_overrides={VLLM_CPU}")
    out: dict = {}
    for backend, extra in (("hf", []), ("vllm", vllm)):
        cfg = load_config(None, [*common, *extra])
        eval_step(cfg, hf, [], base / f"eval_{backend}", label=backend)
        rows = (base / f"eval_{backend}" / "predictions" / "test.jsonl").read_text().splitlines()
        # vLLM's incremental detokenizer holds back an incomplete UTF-8 character at the end
        texts = {r["id"]: r["samples"][0]["text"] for r in map(json.loads, rows)}
        out[backend] = {k: t.rstrip("\ufffd") for k, t in texts.items()}
    cfg = load_config(None, [*common, *vllm])
    triage_step(cfg, hf, base / "triage")
    rows = (base / "triage" / "samples.jsonl").read_text().splitlines()
    out["triage_samples"] = [len(json.loads(r)["samples"]) for r in rows]
    return out
