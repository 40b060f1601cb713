#!/usr/bin/env python3
"""Load a HF checkpoint into the engine and into transformers, compare logits; run it before a
long job.

    python tools/verify_conversion.py --hf-dir D --tp N --pp M [--tolerance 1e-4]

Runs an image+text batch (Qwen2.5-VL: one image, two images, text-only and one image samples)
and a text-only batch through both and prints the max abs logit difference over real tokens.
Exits 1 when it exceeds ``--tolerance`` (2 when the checkpoint cannot be loaded). On a CPU box
it starts N*M local processes; under torchrun / srun it runs in the processes it was given
(transformers then runs on the rank that holds the logits).
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="verify_conversion", description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF folder (config.json + safetensors)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="default float32"
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="max abs logit diff allowed (1e-4)"
    )
    parser.add_argument("--timeout-s", type=int, default=1800)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from megatron_metis.checkpoint import CheckpointError
    from megatron_metis.checkpoint.verify import (
        engine_logits_worker,
        hf_reference_logits,
        max_logit_diffs,
        synthetic_batches,
    )
    from megatron_metis.config import ConfigError
    from megatron_metis.models import read_hf_config
    from megatron_metis.parallel import WorkerError, launched_externally, spawn

    args = parse_args(argv)
    try:
        batches = synthetic_batches(read_hf_config(args.hf_dir))
        layout = (args.hf_dir, args.tp, args.pp, batches, args.dtype)
        if launched_externally(os.environ):
            engine = engine_logits_worker(*layout)
            if engine is None:
                return 0
        else:
            per_rank = spawn(
                engine_logits_worker, args.tp * args.pp, *layout, timeout_s=args.timeout_s
            )
            engine = next(out for out in per_rank if out is not None)
        reference = hf_reference_logits(args.hf_dir, batches, args.dtype)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WorkerError as err:
        print(f"error: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    diffs = max_logit_diffs(reference, engine, batches)
    for name, diff in diffs.items():
        print(f"{name}: max abs logit diff {diff:.3e} (tp={args.tp} pp={args.pp} {args.dtype})")
    # A NaN diff (a NaN in the checkpoint or the engine) fails: `nan <= tol` is False, and the
    # worst batch is picked so that a NaN is never hidden behind a finite diff by max()'s order.
    worst = max(diffs.values(), key=lambda d: math.inf if math.isnan(d) else d)
    ok = all(diff <= args.tolerance for diff in diffs.values())
    verdict = "OK" if ok else "FAIL"
    print(f"{verdict}: max abs logit diff {worst:.3e}, tolerance {args.tolerance:.1e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
