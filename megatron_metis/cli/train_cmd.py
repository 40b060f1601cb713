"""``metis sft RECIPE [overrides]``, ``metis rl RECIPE [overrides]`` and ``metis init-tiny``.

Under torchrun or srun (one process per GPU) the phase runs in the processes it was given. On
a CPU box it runs in this process when one rank is enough, else it starts ``--nproc`` local
gloo ranks itself (default: tp * pp * cp). Rerunning the same command resumes from the run's
latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_metis.config import ConfigError, load_config


def run_phase(phase: str, args: argparse.Namespace) -> int:
    """Load the recipe and run the phase on this process or on spawned local ranks."""
    from megatron_metis.checkpoint import CheckpointError
    from megatron_metis.parallel import WorkerError, launched_externally, spawn
    from megatron_metis.rollout import WeightSyncError
    from megatron_metis.trainer.launch import run_phase_on_rank

    try:
        cfg = load_config(args.recipe, args.overrides)
        nproc = args.nproc or cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
        threads = max(1, (os.cpu_count() or 1) // nproc)
        if launched_externally(os.environ) or nproc == 1:
            final = run_phase_on_rank(phase, cfg, 0 if launched_externally(os.environ) else threads)
        else:
            final = spawn(run_phase_on_rank, nproc, phase, cfg, threads, timeout_s=args.timeout_s)[
                0
            ]
    except (CheckpointError, ConfigError, WeightSyncError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except WorkerError as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        print(f"error: {lines[-1] if lines else err}", file=sys.stderr)
        return 1
    summary = ", ".join(
        f"{k}={v:.4g}" for k, v in sorted(final.items()) if "/" not in k or "eval" in k
    )
    print(f"{phase} done: {summary}")
    return 0


def _init_tiny(args: argparse.Namespace) -> int:
    from megatron_metis.models.tiny import build_tiny_qwen2_5_vl

    out = build_tiny_qwen2_5_vl(
        args.out,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"tiny Qwen2.5-VL in {out}")
    return 0


def register(subparsers) -> None:
    for phase, text in (
        ("sft", "supervised fine-tuning on assistant tokens (Metis-RISE stage 2, warm-up)"),
        ("rl", "the GRPO-variant RL phase (Metis-RISE stage 1)"),
    ):
        sub = subparsers.add_parser(phase, help=text, description=text)
        sub.add_argument("recipe", help="YAML recipe (examples/recipes/*.yaml)")
        sub.add_argument("overrides", nargs="*", help="dotted overrides: section.key=value")
        sub.add_argument(
            "--nproc",
            type=int,
            default=0,
            help="CPU: local ranks to start (default tp*pp*cp; ignored under torchrun/srun)",
        )
        sub.add_argument("--timeout-s", type=float, default=7 * 24 * 3600)
        sub.set_defaults(func=lambda args, p=phase: run_phase(p, args))
    tiny = subparsers.add_parser("init-tiny", help="write a tiny random Qwen2.5-VL HF folder")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--num-layers", type=int, default=4)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(func=_init_tiny)
