"""``metis convert``: HF <-> Megatron checkpoint conversion at any TP/PP.

On a CPU box the command starts TP*PP local processes itself; under torchrun or srun it runs in
the processes it was given.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from megatron_metis.config import ModelConfig, ParallelConfig


def _add_layout_args(parser: argparse.ArgumentParser, default_dtype: str) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=default_dtype,
        help=f"dtype the model is built in (default {default_dtype})",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto"
    )
    parser.add_argument("--timeout-s", type=int, default=3600, help="collective timeout")


def hf_to_megatron_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_hf_to_megatron",
        description="Convert a Hugging Face checkpoint folder into a Megatron distributed "
        "checkpoint (loadable at any TP/PP).",
    )
    parser.add_argument("--hf-dir", required=True, help="HF folder (config.json + safetensors)")
    parser.add_argument("--out-dir", required=True, help="checkpoint folder to create")
    _add_layout_args(parser, "float32")
    return parser


def megatron_to_hf_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_megatron_to_hf",
        description="Convert a megatron_metis checkpoint into a Hugging Face folder that "
        "transformers and vLLM load directly.",
    )
    parser.add_argument("--ckpt-dir", required=True, help="megatron_metis checkpoint folder")
    parser.add_argument("--out-dir", required=True, help="HF folder to create")
    parser.add_argument("--max-shard-size-mb", type=int, default=5000)
    parser.add_argument("--overwrite", action="store_true", help="replace --out-dir if it exists")
    _add_layout_args(parser, "float32")
    return parser


def _hf_to_megatron_rank(args: argparse.Namespace) -> None:
    from megatron_metis.checkpoint import hf_to_megatron

    ctx = _init(args)
    hf_to_megatron(args.hf_dir, args.out_dir, ctx, ModelConfig(dtype=args.dtype))
    ctx.destroy()


def _megatron_to_hf_rank(args: argparse.Namespace) -> None:
    from megatron_metis.checkpoint import megatron_to_hf

    ctx = _init(args)
    megatron_to_hf(
        args.ckpt_dir,
        args.out_dir,
        ctx,
        ModelConfig(dtype=args.dtype),
        max_shard_bytes=args.max_shard_size_mb * 1024**2,
        overwrite=args.overwrite,
    )
    ctx.destroy()


def _init(args: argparse.Namespace):
    import torch

    from megatron_metis.parallel import init_parallel

    if torch.cuda.device_count() == 0:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (args.tp * args.pp)))
    cfg = ParallelConfig(tp=args.tp, pp=args.pp, device=args.device, timeout_s=args.timeout_s)
    return init_parallel(cfg)


def run_on_ranks(rank_fn, args: argparse.Namespace) -> int:
    """Run ``rank_fn(args)`` on TP*PP processes: in place under torchrun/srun, else spawned."""
    from megatron_metis.checkpoint import CheckpointError
    from megatron_metis.config import ConfigError
    from megatron_metis.parallel import WorkerError, launched_externally, spawn

    try:
        if launched_externally(os.environ):
            rank_fn(args)
        else:
            spawn(rank_fn, args.tp * args.pp, args, timeout_s=args.timeout_s)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except WorkerError as err:
        print(f"error: {_last_line(str(err))}", file=sys.stderr)
        return 1
    return 0


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def main_hf_to_megatron(argv: Sequence[str] | None = None) -> int:
    return run_on_ranks(_hf_to_megatron_rank, hf_to_megatron_parser().parse_args(argv))


def main_megatron_to_hf(argv: Sequence[str] | None = None) -> int:
    return run_on_ranks(_megatron_to_hf_rank, megatron_to_hf_parser().parse_args(argv))


def register(subparsers) -> None:
    convert = subparsers.add_parser("convert", help="convert checkpoints between HF and Megatron")
    kinds = convert.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    for name, build, rank_fn in (
        ("hf-to-megatron", hf_to_megatron_parser, _hf_to_megatron_rank),
        ("megatron-to-hf", megatron_to_hf_parser, _megatron_to_hf_rank),
    ):
        template = build()
        sub = kinds.add_parser(name, help=template.description, parents=[template], add_help=False)
        sub.set_defaults(func=lambda args, fn=rank_fn: run_on_ranks(fn, args))
