"""Triage: sample N responses per training prompt from the RL model, bucket prompts by pass rate,
and keep the self-distillation targets.

Buckets (pass rate p = correct / N):
    ``mastered`` (p = 1): dropped;
    ``self_distill`` (0 < p < 1): up to ``k`` of the model's own verified-correct responses,
    exactly as generated, become SFT targets;
    ``expert`` (p = 0): handed to the expert stage.

Files in the stage folder:
    ``samples.jsonl``: per prompt, every sample with its verdict (the progress log: a re-run
    samples only the prompts missing from it);
    ``pass_rates.jsonl``: ``{id, source, category, modality, n, n_correct, pass_rate, bucket}``;
    ``self_distill.jsonl``: SFT rows (problem row + ``response``; see ``sft_row``);
    ``expert_prompts.jsonl``: the p = 0 problems as dataset rows (the expert stage's input);
    ``report.json`` / ``report.md``: counts per bucket, per source, category and modality.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_metis.config.rl import RolloutConfig
from megatron_metis.config.stages import TriageConfig
from megatron_metis.data.io import ProgressLog
from megatron_metis.data.schema import Problem
from megatron_metis.rollout.client import RolloutClient, ScoredSample, Scorer, sampling_params
from megatron_metis.stages.runner import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from megatron_metis.stages.runner import atomic_write_text as write_text

Bucket = Literal["mastered", "self_distill", "expert"]
BUCKETS: tuple[Bucket, ...] = ("mastered", "self_distill", "expert")
KeepRule = Literal["all", "random", "shortest"]


def bucket_of(n_correct: int, n: int) -> Bucket:
    """The triage bucket of a prompt with ``n_correct`` verified-correct responses of ``n``."""
    if n < 1 or not 0 <= n_correct <= n:
        raise ValueError(f"need 0 <= n_correct <= n and n >= 1, got {n_correct} of {n}")
    if n_correct == n:
        return "mastered"
    return "expert" if n_correct == 0 else "self_distill"


def select_self_distill(
    samples: Sequence[ScoredSample], *, keep: KeepRule, k: int, rng: random.Random
) -> list[ScoredSample]:
    """The self-distillation targets of one prompt: verified-correct, complete responses.

    Args:
        samples: the prompt's scored samples, in sample order.
        keep: ``all``: in sample order; ``random``: a random subset; ``shortest``: fewest
            tokens first (ties by sample order).
        k: most kept; 0 keeps every correct one.
        rng: drives ``random`` (seed it for reproducible selections).

    Truncated responses (``finish_reason == "length"``) are never kept, even when correct.
    """
    good = [s for s in samples if s.correct and s.finish_reason != "length"]
    limit = len(good) if k == 0 else min(k, len(good))
    if keep == "all":
        return good[:limit]
    if keep == "shortest":
        return sorted(good, key=lambda s: (s.num_tokens, s.sample_index))[:limit]
    if keep == "random":
        return sorted(rng.sample(good, limit), key=lambda s: s.sample_index)
    raise ValueError(f"unknown keep rule {keep!r}")


@dataclass(frozen=True)
class TriageRecord:
    """One prompt's triage outcome."""

    problem: Problem
    samples: tuple[ScoredSample, ...]

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def n_correct(self) -> int:
        return sum(s.correct for s in self.samples)

    @property
    def pass_rate(self) -> float:
        return self.n_correct / self.n

    @property
    def bucket(self) -> Bucket:
        return bucket_of(self.n_correct, self.n)

    def summary(self) -> dict[str, Any]:
        p = self.problem
        return {
            "id": p.id,
            "source": p.source,
            "category": p.category,
            "modality": p.modality,
            "n": self.n,
            "n_correct": self.n_correct,
            "pass_rate": self.pass_rate,
            "bucket": self.bucket,
        }


def problem_to_row(problem: Problem, *, out_file: str | Path) -> dict[str, Any]:
    """The dataset row of ``problem`` for a JSONL file at ``out_file``.

    Image paths are written relative to ``out_file``'s folder; embedded images (bytes) are
    saved as ``images/<id>_<k>.png`` beside it.
    """
    base = Path(out_file).resolve().parent
    images = []
    for k, src in enumerate(problem.images):
        if isinstance(src, bytes):
            path = base / "images" / f"{_safe(problem.id)}_{k}.png"
            if not path.exists():
                atomic_write_bytes(path, src)
            src = str(path)
        images.append(os.path.relpath(Path(src).resolve(), base))
    row: dict[str, Any] = {"id": problem.id, "question": problem.question, "answer": problem.answer}
    if images:
        row["images"] = images
    if problem.choices:
        row["choices"] = list(problem.choices)
    row["source"] = problem.source
    row["category"] = problem.category
    if problem.difficulty is not None:
        row["difficulty"] = problem.difficulty
    if problem.expert is not None:
        row["expert"] = problem.expert
    row.update({k: v for k, v in problem.extra.items() if k not in row})
    return row


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def sft_row(
    problem: Problem, response: str, *, origin: str, tag: str, out_file: Path, **extra: Any
) -> dict[str, Any]:
    """An SFT row: the problem's dataset row with ``id`` = ``<problem id>#<tag>`` (unique per
    trajectory), ``problem_id``, the target assistant text in ``response`` and ``origin``."""
    row = problem_to_row(problem, out_file=out_file)
    row.pop("expert", None)
    row["id"] = f"{problem.id}#{tag}"
    row["problem_id"] = problem.id
    row["response"] = response
    row["origin"] = origin
    row.update(extra)
    return row


def self_distill_rows(
    records: Sequence[TriageRecord], cfg: TriageConfig, *, out_file: Path
) -> list[dict[str, Any]]:
    """SFT rows of the 0 < p < 1 prompts (selection rule ``cfg.keep``, ``cfg.k``)."""
    rng = random.Random(cfg.seed)
    rows = []
    for rec in records:
        if rec.bucket != "self_distill":
            continue
        for s in select_self_distill(rec.samples, keep=cfg.keep, k=cfg.k, rng=rng):
            rows.append(
                sft_row(
                    rec.problem,
                    s.text,
                    origin="self_distill",
                    tag=f"s{s.sample_index}",
                    out_file=out_file,
                    pass_rate=rec.pass_rate,
                    sample_index=s.sample_index,
                )
            )
    return rows


def triage_report(
    records: Sequence[TriageRecord], *, n_self_distill_rows: int, cfg: TriageConfig
) -> dict[str, Any]:
    """Counts per bucket, overall and per source, category and modality; pass-rate histogram."""
    by: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for rec in records:
        for axis in ("source", "category", "modality"):
            key = getattr(rec.problem, axis) or "(none)"
            by[axis][key][rec.bucket] += 1
    histogram = Counter(f"{r.n_correct}/{r.n}" for r in records)
    return {
        "num_prompts": len(records),
        "num_samples": cfg.num_samples,
        "mean_pass_rate": sum(r.pass_rate for r in records) / max(1, len(records)),
        "buckets": {b: sum(r.bucket == b for r in records) for b in BUCKETS},
        "by_source": _plain(by["source"]),
        "by_category": _plain(by["category"]),
        "by_modality": _plain(by["modality"]),
        "pass_rate_histogram": dict(sorted(histogram.items(), key=lambda kv: _frac(kv[0]))),
        "self_distill": {
            "prompts": sum(r.bucket == "self_distill" for r in records),
            "trajectories": n_self_distill_rows,
            "keep": cfg.keep,
            "k": cfg.k,
        },
    }


def _plain(table: Mapping[str, Counter[str]]) -> dict[str, dict[str, int]]:
    return {key: {b: counts[b] for b in BUCKETS} for key, counts in sorted(table.items())}


def _frac(text: str) -> tuple[int, int]:
    a, b = text.split("/")
    return int(b), int(a)


def report_markdown(report: Mapping[str, Any]) -> str:
    """The triage report as Markdown tables."""
    b = report["buckets"]
    lines = [
        "# Triage report",
        "",
        f"{report['num_prompts']} prompts, {report['num_samples']} samples each, "
        f"mean pass rate {report['mean_pass_rate']:.3f}.",
        "",
        "| bucket | rule | prompts |",
        "|---|---|---:|",
        f"| mastered | p = 1, dropped | {b['mastered']} |",
        f"| self_distill | 0 < p < 1 | {b['self_distill']} |",
        f"| expert | p = 0 | {b['expert']} |",
        "",
        f"Self-distilled trajectories: {report['self_distill']['trajectories']} "
        f"(keep={report['self_distill']['keep']}, k={report['self_distill']['k']}).",
    ]
    for axis in ("source", "category", "modality"):
        lines += ["", f"## By {axis}", "", f"| {axis} | mastered | self_distill | expert |"]
        lines.append("|---|---:|---:|---:|")
        for key, counts in report[f"by_{axis}"].items():
            lines.append(f"| {key} | " + " | ".join(str(counts[x]) for x in BUCKETS) + " |")
    lines += ["", "## Pass-rate histogram", "", "| correct / N | prompts |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["pass_rate_histogram"].items()]
    return "\n".join(lines) + "\n"


def run_triage(
    problems: Sequence[Problem],
    client: RolloutClient,
    scorer: Scorer,
    cfg: TriageConfig,
    *,
    rollout: RolloutConfig,
    out_dir: str | Path,
) -> dict[str, Any]:
    """The whole triage stage into ``out_dir`` (resumable from ``samples.jsonl``).

    Returns:
        The report (also written as ``report.json`` / ``report.md``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = client.score_problems(
        problems,
        sampling_params(rollout, cfg),
        scorer,
        progress=ProgressLog(out / "samples.jsonl"),
        prompts_per_batch=cfg.prompts_per_batch,
    )
    records = [
        TriageRecord(problem=p, samples=tuple(s)) for p, s in zip(problems, samples, strict=True)
    ]
    return write_triage_outputs(records, cfg, out)


def write_triage_outputs(
    records: Sequence[TriageRecord], cfg: TriageConfig, out: Path
) -> dict[str, Any]:
    """Pass rates, self-distilled SFT rows, expert prompts and the report, each atomically."""
    atomic_write_jsonl(out / "pass_rates.jsonl", [r.summary() for r in records])
    rows = self_distill_rows(records, cfg, out_file=out / "self_distill.jsonl")
    atomic_write_jsonl(out / "self_distill.jsonl", rows)
    expert_file = out / "expert_prompts.jsonl"
    atomic_write_jsonl(
        expert_file,
        [problem_to_row(r.problem, out_file=expert_file) for r in records if r.bucket == "expert"],
    )
    report = triage_report(records, n_self_distill_rows=len(rows), cfg=cfg)
    atomic_write_json(out / "report.json", report)
    write_text(out / "report.md", report_markdown(report))
    return report
