"""The ``metis`` console entry point: one subcommand per job (the only argv reader)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module defines ``register(subparsers)``, which adds its subcommand(s) and sets
# ``func(args) -> int`` on them. Each module imports its heavy dependencies inside its
# handlers, so `metis --help` stays fast.
_COMMAND_MODULES = (
    "megatron_metis.cli.convert_cmd",
    "megatron_metis.cli.data_cmd",
    "megatron_metis.cli.stages_cmd",
    "megatron_metis.cli.train_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metis",
        description="Metis-RISE trainer for vision-language models on Megatron-Core.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
