"""``metis pipeline``: Metis-RISE end to end, every stage resumable.

    [warm-up SFT] -> eval(base) -> for each round: RL -> triage -> expert -> SFT mix -> SFT
                  -> eval(rl), eval(rl_sft) -> report

Layout under ``run.output_dir``::

    warmup/            the optional warm-up SFT run (its ``hf/`` is the base model)
    round1/rl/         the RL run (checkpoints, metrics.jsonl, hf/)
    round1/triage/ round1/expert/ round1/sft_data/ round1/sft/
    eval/base/ eval/rl/ eval/rl_sft/   (later rounds: rl_r2, rl_sft_r2, ...)
    report/            results.json, results.md, rl_curves.png, sft_loss.png

The pipeline's ``run.seed`` is every phase's ``run.seed`` (a tiny model's initialisation, data
order) and, plus the round number, the RL rollout seed. A stage is skipped when its ``DONE``
marker exists and its recorded inputs (config, data files, upstream stages) are the ones asked
for; a training phase killed mid-way resumes from its own latest checkpoint when the pipeline is
rerun. Edit the recipe or regenerate the data and rerun: the stages whose inputs changed, and
the ones after them, are redone (their old folders kept as ``<stage>.replaced-<k>``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_metis.config import ConfigError, MetisConfig, load_config
from megatron_metis.stages.report import write_report
from megatron_metis.stages.runner import run_stage
from megatron_metis.stages.steps import (
    EVAL_FILE,
    EXPERT_FILE,
    SELF_DISTILL_FILE,
    SFT_MIX_FILE,
    eval_step,
    expert_step,
    sft_mix_step,
    stage_inputs,
    triage_step,
)

logger = logging.getLogger(__name__)


def phase_config(recipe: str, overrides: Sequence[str], **settings: Any) -> MetisConfig:
    """Load a phase recipe with its overrides, then the pipeline's own ``section.key`` settings."""
    if not recipe:
        raise ConfigError("the pipeline needs pipeline.rl_recipe and pipeline.sft_recipe")
    pinned = [f"{key}={_yaml(value)}" for key, value in settings.items()]
    return load_config(recipe, [*overrides, *pinned])


def _yaml(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def train_phase(phase: str, cfg: MetisConfig) -> dict[str, float]:
    """Run ``metis sft`` / ``metis rl`` for ``cfg``: in this process for one rank, else on
    ``tp * pp * cp`` spawned local ranks (CPU)."""
    from megatron_metis.parallel import spawn
    from megatron_metis.trainer.launch import run_phase_on_rank

    nproc = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    if nproc == 1:
        return run_phase_on_rank(phase, cfg, 0)
    return spawn(run_phase_on_rank, nproc, phase, cfg, 1, timeout_s=7 * 24 * 3600)[0]


def _phase_stage(name: str, phase: str, cfg: MetisConfig, *, force: bool) -> Path:
    """A training phase as a stage: done when it exported ``<output_dir>/hf``."""
    out = Path(cfg.run.output_dir)

    def work(_: Path) -> dict[str, Any]:
        final = train_phase(phase, cfg)
        return {"final": {k: v for k, v in final.items() if isinstance(v, (int, float))}}

    # logging settings do not change what a phase trains
    sections = [f.name for f in dataclasses.fields(cfg) if f.name != "logging"]
    inputs = stage_inputs(
        cfg,
        sections,
        files=[*cfg.data.train_files, *cfg.data.test_files],
        upstream=[Path(cfg.model.hf_dir).parent],
    )
    run_stage(name, out, work, force=force, inputs=inputs)
    return out / "hf"


def run_metis_rise(cfg: MetisConfig, *, force: bool = False) -> dict[str, Any]:
    """The whole recipe from a pipeline config; returns the report's results."""
    p, root = cfg.pipeline, Path(cfg.run.output_dir)
    base = Path(cfg.model.hf_dir)
    sft_metrics, rl_metrics = [], []
    # every phase shares the pipeline's data and seed (a tiny model's init, data order, sampling)
    data = {
        "data.train_files": cfg.data.train_files,
        "data.test_files": cfg.data.test_files,
        "run.seed": cfg.run.seed,
    }
    if p.warmup_recipe:
        warm_data = {**data, "data.train_files": p.warmup_train_files or cfg.data.train_files}
        warm = phase_config(
            p.warmup_recipe, p.warmup_overrides, **warm_data, **{"run.output_dir": root / "warmup"}
        )
        base = _phase_stage("warmup", "sft", warm, force=force)
    evals = {}
    if "base" in p.eval_stages:
        evals["base"] = _eval(cfg, base, root, "base", force)
    policy = base
    for r in range(1, p.rounds + 1):
        tag, rd = ("" if r == 1 else f"_r{r}"), root / f"round{r}"
        rl_cfg = phase_config(
            p.rl_recipe,
            p.rl_overrides,
            **data,
            **{
                "run.output_dir": rd / "rl",
                "model.hf_dir": policy,
                "model.init_tiny": False,
                "rollout.seed": cfg.run.seed + r,
            },
        )
        rl_hf = _phase_stage(f"rl{tag}", "rl", rl_cfg, force=force)
        rl_metrics.append(rd / "rl" / "metrics.jsonl")
        triage_step(cfg, rl_hf, rd / "triage", force=force)
        expert_step(cfg, rd / "triage", rd / "expert", force=force)
        sft_mix_step(
            cfg,
            [rd / "triage" / SELF_DISTILL_FILE],
            [rd / "expert" / EXPERT_FILE],
            rd / "sft_data",
            force=force,
        )
        sft_cfg = phase_config(
            p.sft_recipe,
            p.sft_overrides,
            **{
                "run.output_dir": rd / "sft",
                "model.hf_dir": rl_hf,
                "model.init_tiny": False,
                "data.train_files": [rd / "sft_data" / SFT_MIX_FILE],
                "data.test_files": cfg.data.test_files,
                "sft.response_field": "response",
                "run.seed": cfg.run.seed,
            },
        )
        policy = _phase_stage(f"sft{tag}", "sft", sft_cfg, force=force)
        sft_metrics.append(rd / "sft" / "metrics.jsonl")
        if "rl" in p.eval_stages:
            evals[f"rl{tag}"] = _eval(cfg, rl_hf, root, f"rl{tag}", force)
        if "rl_sft" in p.eval_stages:
            evals[f"rl_sft{tag}"] = _eval(cfg, policy, root, f"rl_sft{tag}", force)
    return write_report(evals, root / "report", rl_metrics=rl_metrics, sft_metrics=sft_metrics)


def _eval(cfg: MetisConfig, hf_dir: Path, root: Path, label: str, force: bool) -> Path:
    eval_step(cfg, hf_dir, [], root / "eval" / label, label=label, force=force)
    return root / "eval" / label / EVAL_FILE
