"""`metis data check FILE...` and `metis data synth --out DIR --n N --seed S`."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``data`` command and its ``check`` and ``synth`` subcommands."""
    data = subparsers.add_parser("data", help="validate datasets, generate synthetic tasks")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    check = sub.add_parser("check", help="validate datasets and list every bad row")
    check.add_argument("files", nargs="+", metavar="FILE", help="JSONL or Parquet datasets")
    check.add_argument("--max-prompt-tokens", type=int, default=None)
    check.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: the tiny built-in one)"
    )
    check.add_argument("--no-length-check", action="store_true", help="skip token counting")
    check.set_defaults(func=run_check)

    synth = sub.add_parser("synth", help="write a synthetic dataset with expert solutions")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--n", type=int, required=True, help="number of problems (train+test)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--test-frac", type=float, default=0.2)
    synth.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    synth.add_argument("--categories", default=None, help="comma list (default: all)")
    synth.add_argument("--difficulties", default="1,2,3", help="comma list of 1-3")
    synth.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="FILE",
        help="synthetic JSONL files whose problems (by `key`) must not be generated again",
    )
    synth.set_defaults(func=run_synth)


def run_check(args: argparse.Namespace) -> int:
    """Print every bad row (file, index, id, reason); exit 1 when there is any."""
    from megatron_metis.config.data import DataConfig
    from megatron_metis.data.check import check_files

    cfg = DataConfig()
    if args.max_prompt_tokens is not None:
        cfg = DataConfig(max_prompt_tokens=args.max_prompt_tokens)
    cfg.validate()
    tokenizer = None if args.no_length_check else _tokenizer(args.tokenizer)
    result = check_files(args.files, cfg, tokenizer)
    for bad in result.bad_rows:
        print(f"BAD {bad}")
    print(f"{result.n_rows} rows, {len(result.problems)} ok, {result.n_skipped} bad")
    return 1 if result.bad_rows else 0


def _tokenizer(path: str | None) -> Any:
    if path is None:
        from megatron_metis.data.tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def run_synth(args: argparse.Namespace) -> int:
    """Write the dataset and print what was written."""
    from megatron_metis.data.synth import CATEGORIES, write_synthetic_dataset

    categories = args.categories.split(",") if args.categories else list(CATEGORIES)
    difficulties = [int(d) for d in args.difficulties.split(",")]
    summary = write_synthetic_dataset(
        args.out,
        n=args.n,
        seed=args.seed,
        test_frac=args.test_frac,
        fmt=args.format,
        categories=categories,
        difficulties=difficulties,
        exclude_keys=_synthetic_keys(args.exclude),
    )
    for name, path in summary.files.items():
        print(f"{name}: {path}")
    print(" ".join(f"{k}={v}" for k, v in summary.counts.items()))
    return 0


def _synthetic_keys(files: list[str]) -> set[str]:
    """The ``key`` of every row of the given synthetic JSONL files."""
    import json

    keys: set[str] = set()
    for path in files:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "key" not in row:
                    raise ValueError(f"{path}: row {i} ({row.get('id')!r}) has no synthetic `key`")
                keys.add(row["key"])
    return keys
