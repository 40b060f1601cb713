"""``metis triage``, ``metis expert`` and ``metis eval``: the Metis-RISE stages around training.

    metis triage RECIPE --ckpt HF_DIR [--out DIR] [--force] [section.key=value ...]
    metis expert RECIPE [--triage DIR] [--out DIR] [--force] [section.key=value ...]
    metis eval RECIPE --ckpt HF_DIR [--data FILE ...] [--label L] [--out DIR] [--force] [...]
    metis pipeline RECIPE [--force] [section.key=value ...]

Each stage writes into its folder (default under ``run.output_dir``), is skipped when its
``DONE`` marker exists and its recorded inputs (``INPUTS.json``: config sections, data file
contents, upstream stages) are the ones asked for, and resumes from its progress files
otherwise. A stage with other inputs, or run with ``--force``, starts from scratch; its old
folder is kept as ``<folder>.replaced-<k>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

_HELP = {
    "triage": "sample N responses per training prompt and bucket prompts by pass rate",
    "expert": "verified expert trajectories for the prompts with pass rate 0",
    "eval": "accuracy per dataset and category with the training verifier",
}


def _add_options(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--out", default=None, help="stage folder (default under run.output_dir)")
    parser.add_argument(
        "--force", action="store_true", help="redo from scratch (old folder kept as .replaced-K)"
    )
    parser.add_argument("--device", default="cpu", help="device of the HF rollout engine")
    if command in ("triage", "eval"):
        parser.add_argument("--ckpt", default=None, help="HF checkpoint folder (required)")
    if command == "expert":
        parser.add_argument("--triage", default=None, help="triage folder (default: run's)")
    if command == "eval":
        parser.add_argument(
            "--data",
            nargs="+",
            default=[],
            metavar="FILE",
            help="datasets (default: eval.datasets)",
        )
        parser.add_argument("--label", default="", help="name of the checkpoint in the report")


def register(subparsers: Any) -> None:
    """Add the ``triage``, ``expert`` and ``eval`` commands.

    Options may come before or after the recipe and mix with the overrides, so everything after
    the recipe is parsed again by ``_reparse``.
    """
    handlers = {"triage": run_triage_cmd, "expert": run_expert_cmd, "eval": run_eval_cmd}
    for command, handler in handlers.items():
        parser = subparsers.add_parser(command, help=_HELP[command])
        parser.add_argument("recipe", help="YAML recipe")
        parser.add_argument(
            "rest", nargs=argparse.REMAINDER, help="options and overrides (section.key=value)"
        )
        _add_options(parser, command)
        parser.set_defaults(func=handler, command_name=command)
    pipeline = subparsers.add_parser(
        "pipeline", help="Metis-RISE end to end: [warm-up] -> RL -> triage -> expert -> SFT -> eval"
    )
    pipeline.add_argument("recipe", help="pipeline recipe (examples/recipes/pipeline-*.yaml)")
    pipeline.add_argument("overrides", nargs="*", help="dotted overrides: section.key=value")
    pipeline.add_argument(
        "--force", action="store_true", help="redo every stage (old folders kept as .replaced-K)"
    )
    pipeline.set_defaults(func=run_pipeline_cmd)


def _reparse(args: argparse.Namespace) -> argparse.Namespace:
    """Options and overrides after the recipe, merged over those given before it."""
    parser = argparse.ArgumentParser(prog=f"metis {args.command_name}")
    _add_options(parser, args.command_name)
    parser.add_argument("overrides", nargs="*")
    later = parser.parse_intermixed_args(args.rest)
    merged = vars(args).copy()
    defaults = vars(parser.parse_args([]))
    for key, value in vars(later).items():
        if key == "overrides" or value != defaults.get(key):
            merged[key] = value
    out = argparse.Namespace(**merged)
    if args.command_name in ("triage", "eval") and not out.ckpt:
        parser.error("--ckpt is required")
    return out


def _config(args: argparse.Namespace) -> Any:
    from megatron_metis.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return load_config(args.recipe, args.overrides)


def _print(summary: dict[str, Any], out: Path, files: tuple[str, ...]) -> None:
    state = "skipped (done already)" if summary.get("skipped") else "done"
    print(f"{state}: {out}")
    for name in files:
        if (out / name).exists():
            print(f"  {out / name}")
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}, indent=2))


def run_triage_cmd(args: argparse.Namespace) -> int:
    args = _reparse(args)
    from megatron_metis.stages.steps import triage_step

    cfg = _config(args)
    out = Path(args.out or Path(cfg.run.output_dir) / "triage")
    summary = triage_step(cfg, args.ckpt, out, force=args.force, device=args.device)
    _print(summary, out, ("report.md", "pass_rates.jsonl", "self_distill.jsonl"))
    return 0


def run_expert_cmd(args: argparse.Namespace) -> int:
    args = _reparse(args)
    from megatron_metis.stages.steps import expert_step

    cfg = _config(args)
    triage = Path(args.triage or Path(cfg.run.output_dir) / "triage")
    out = Path(args.out or Path(cfg.run.output_dir) / "expert")
    summary = expert_step(cfg, triage, out, force=args.force, device=args.device)
    _print(summary, out, ("report.md", "expert.jsonl", "rejects.jsonl"))
    return 0


def run_eval_cmd(args: argparse.Namespace) -> int:
    args = _reparse(args)
    from megatron_metis.stages.steps import eval_step

    cfg = _config(args)
    label = args.label or Path(args.ckpt).name
    out = Path(args.out or Path(cfg.run.output_dir) / "eval" / label)
    summary = eval_step(
        cfg, args.ckpt, args.data, out, label=label, force=args.force, device=args.device
    )
    _print(summary, out, ("eval.md", "eval.json"))
    return 0


def run_pipeline_cmd(args: argparse.Namespace) -> int:
    from megatron_metis.config import ConfigError
    from megatron_metis.parallel import WorkerError
    from megatron_metis.stages.pipeline import run_metis_rise

    try:
        cfg = _config(args)
        results = run_metis_rise(cfg, force=args.force)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except WorkerError as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        print(f"error: {lines[-1] if lines else err}", file=sys.stderr)
        return 1
    report = Path(cfg.run.output_dir) / "report"
    print((report / "results.md").read_text())
    print(f"report: {report / 'results.md'}, {report / 'results.json'}")
    for plot in results.get("plots", []):
        print(f"plot: {report / plot}")
    return 0
