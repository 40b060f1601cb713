"""The stages as resumable steps over a ``MetisConfig``: what ``metis pipeline`` strings together.

Each ``*_step`` runs its stage in its own folder through ``runner.run_stage`` (skipped when the
folder's ``DONE`` marker exists; resumed from the stage's progress file or cache otherwise) and
returns the stage summary. A pipeline round is::

    triage_step(cfg, rl_hf_dir, run / "triage")
    expert_step(cfg, run / "triage", run / "expert")
    sft_mix_step(cfg, [run / "triage" / SELF_DISTILL_FILE], [run / "expert" / EXPERT_FILE],
                 run / "sft_data")                       # -> run / "sft_data" / SFT_MIX_FILE
    ... SFT from the RL checkpoint on that file (the trainer) ...
    eval_step(cfg, hf_dir, files, run / "eval" / label, label=label)   # base, rl, rl_sft
    write_report({label: run / "eval" / label / EVAL_FILE, ...}, run / "report",
                 rl_metrics=[...], sft_metrics=[...])

Each step records what its outputs depend on (``stage_inputs``): rerun with an edited recipe,
regenerated data or a redone upstream stage, it is redone instead of skipped (see ``runner``).

Scripts that call these need an ``if __name__ == "__main__":`` guard: the verifier's worker
processes are started with forkserver/spawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_metis.config.loader import to_plain
from megatron_metis.config.schema import MetisConfig
from megatron_metis.data.check import load_problems
from megatron_metis.data.schema import Problem
from megatron_metis.rewards.scorer import RewardScorer
from megatron_metis.rollout.client import RolloutClient, load_client, sampling_params
from megatron_metis.rollout.engine import SamplingParams
from megatron_metis.stages.evaluation import dataset_names, evaluate
from megatron_metis.stages.expert import build_expert_source, run_expert
from megatron_metis.stages.runner import file_digest, run_stage, stage_digest
from megatron_metis.stages.sft_mix import build_sft_mix
from megatron_metis.stages.triage import run_triage

SELF_DISTILL_FILE = "self_distill.jsonl"
EXPERT_PROMPTS_FILE = "expert_prompts.jsonl"
EXPERT_FILE = "expert.jsonl"
SFT_MIX_FILE = "sft.jsonl"
EVAL_FILE = "eval.json"


def stage_inputs(
    cfg: MetisConfig,
    sections: Sequence[str],
    *,
    files: Sequence[str | Path] = (),
    upstream: Sequence[str | Path] = (),
    **extra: Any,
) -> dict[str, Any]:
    """What a stage's outputs depend on: the config sections it reads, the contents of its data
    files and the digests of the stages it builds on (a checkpoint's stage is the folder that
    holds ``hf/``; a folder that is no stage counts by its path only)."""
    plain = to_plain(cfg)
    return {
        "config": {name: plain[name] for name in sections},
        "files": {str(f): file_digest(f) for f in files},
        "upstream": {str(u): stage_digest(u) for u in upstream},
        **extra,
    }


def _sampling_inputs(
    cfg: MetisConfig, section: str, ckpt: str | Path, files: Sequence[str | Path], **extra: Any
) -> dict[str, Any]:
    """Inputs of a stage that samples from the HF checkpoint ``ckpt`` (triage, eval): its own
    section, the rollout/data/reward settings, its data files, and the stage that exported
    ``ckpt`` (the ``<phase>`` folder of ``<phase>/hf``)."""
    return stage_inputs(
        cfg,
        [section, "rollout", "data", "rewards"],
        files=files,
        upstream=[Path(ckpt).parent],
        ckpt=ckpt,
        **extra,
    )


def _problems(files: Sequence[str | Path], cfg: MetisConfig, tokenizer: Any) -> list[Problem]:
    return load_problems([str(f) for f in files], cfg.data, tokenizer).problems


def triage_step(
    cfg: MetisConfig,
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Triage the training prompts (``triage.data_files`` or ``data.train_files``) with the
    HF checkpoint ``ckpt``."""
    files = cfg.triage.data_files or cfg.data.train_files
    if not files:
        raise ValueError("triage needs prompts: set triage.data_files or data.train_files")

    def work(out: Path) -> dict[str, Any]:
        with (
            load_client(ckpt, cfg.rollout, cfg.data, device=device) as client,
            RewardScorer(cfg.rewards) as scorer,
        ):
            problems = _problems(files, cfg, client.tokenizer)
            report = run_triage(
                problems, client, scorer, cfg.triage, rollout=cfg.rollout, out_dir=out
            )
        return {"ckpt": str(ckpt), "buckets": report["buckets"]}

    inputs = _sampling_inputs(cfg, "triage", ckpt, files)
    return run_stage("triage", out_dir, work, force=force, inputs=inputs)


def expert_step(
    cfg: MetisConfig,
    triage_dir: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Expert trajectories for the triage's p = 0 prompts from ``cfg.expert.source``."""

    def work(out: Path) -> dict[str, Any]:
        problems = _problems([Path(triage_dir) / EXPERT_PROMPTS_FILE], cfg, None)
        local: RolloutClient | None = None
        params: SamplingParams | None = None
        if cfg.expert.source == "local":
            local = load_client(cfg.expert.local_hf_dir, cfg.rollout, cfg.data, device=device)
            params = sampling_params(cfg.rollout, cfg.expert, seed=cfg.run.seed)
        source = build_expert_source(
            cfg.expert,
            system_prompt=cfg.data.system_prompt,
            cache_dir=out / "cache",
            local_model=local,
            local_params=params,
        )
        try:
            with RewardScorer(cfg.rewards) as scorer:
                report = run_expert(
                    problems,
                    source,
                    scorer,
                    keep_per_prompt=cfg.expert.keep_per_prompt,
                    out_dir=out,
                )
        finally:
            if local is not None:
                local.close()
        return {
            "accepted": report["accepted"],
            "rejected": report["rejected"],
            "requests": report["requests"],
        }

    inputs = stage_inputs(
        cfg,
        ["expert", "rollout", "data", "rewards"],
        upstream=[triage_dir],
        seed=cfg.run.seed,
    )
    return run_stage("expert", out_dir, work, force=force, inputs=inputs)


def sft_mix_step(
    cfg: MetisConfig,
    self_files: Sequence[str | Path],
    expert_files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """The mixed SFT dataset ``<out_dir>/sft.jsonl`` (``pipeline.expert_fraction`` etc.)."""

    def work(out: Path) -> dict[str, Any]:
        return build_sft_mix(self_files, expert_files, cfg.pipeline, out_file=out / SFT_MIX_FILE)

    p = cfg.pipeline
    inputs = stage_inputs(
        cfg,
        [],
        upstream=sorted({Path(f).parent for f in [*self_files, *expert_files]}),
        files=[*self_files, *expert_files],
        mix={"expert_fraction": p.expert_fraction, "max": p.max_sft_samples, "seed": p.seed},
    )
    return run_stage("sft_mix", out_dir, work, force=force, inputs=inputs)


def eval_step(
    cfg: MetisConfig,
    ckpt: str | Path,
    files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    label: str = "",
    force: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate ``ckpt`` on ``files`` (default ``eval.datasets`` or ``data.test_files``)."""
    files = list(files) or list(cfg.eval.datasets) or list(cfg.data.test_files)
    if not files:
        raise ValueError("eval needs datasets: --data, eval.datasets or data.test_files")
    names = dataset_names(files)

    def work(out: Path) -> dict[str, Any]:
        with (
            load_client(ckpt, cfg.rollout, cfg.data, device=device) as client,
            RewardScorer(cfg.rewards) as scorer,
        ):
            datasets = {name: _problems([f], cfg, client.tokenizer) for name, f in names.items()}
            result = evaluate(
                datasets,
                client,
                scorer,
                cfg.eval,
                rollout=cfg.rollout,
                out_dir=out,
                label=label,
                files=names,
            )
        accs = {name: d["accuracy"] for name, d in result["datasets"].items()}
        return {"ckpt": str(ckpt), "label": label, "accuracy": accs, "average": result["average"]}

    inputs = _sampling_inputs(cfg, "eval", ckpt, files, label=label)
    name = f"eval[{label or Path(ckpt).name}]"
    return run_stage(name, out_dir, work, force=force, inputs=inputs)
