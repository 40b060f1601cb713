"""The targeted SFT set: self-distilled + expert rows mixed at a configurable ratio.

The output is a dataset in the project's problem format plus ``response`` (the assistant target,
``SFTConfig.response_field``), ``origin`` (``self_distill`` | ``expert``) and ``problem_id``;
row ids are unique per trajectory (``<problem id>#s3``, ``<problem id>#e0``). Image paths are
rewritten relative to the output file.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_metis.config.stages import PipelineConfig
from megatron_metis.data.io import read_jsonl
from megatron_metis.stages.runner import atomic_write_jsonl

Row = dict[str, Any]


def mix_counts(n_self: int, n_expert: int, *, expert_fraction: float) -> tuple[int, int]:
    """How many self-distilled and expert rows to keep for ``expert / total = expert_fraction``.

    The side in excess is cut; nothing is repeated. ``expert_fraction < 0`` keeps everything.
    """
    if expert_fraction < 0:
        return n_self, n_expert
    if expert_fraction == 0:
        return n_self, 0
    if expert_fraction == 1:
        return 0, n_expert
    if n_self + n_expert == 0:
        return 0, 0
    if n_expert / (n_self + n_expert) > expert_fraction:
        return n_self, min(n_expert, round(expert_fraction * n_self / (1 - expert_fraction)))
    return min(n_self, round(n_expert * (1 - expert_fraction) / expert_fraction)), n_expert


def _subsample(rows: Sequence[Row], n: int, rng: random.Random) -> list[Row]:
    """``n`` rows drawn without replacement, in their original order."""
    if n >= len(rows):
        return list(rows)
    keep = sorted(rng.sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def mix_sft_rows(
    self_rows: Sequence[Row],
    expert_rows: Sequence[Row],
    *,
    expert_fraction: float,
    max_samples: int = 0,
    seed: int = 0,
) -> tuple[list[Row], dict[str, Any]]:
    """The mixed rows (self-distilled first, then expert) and their counts.

    Args:
        expert_fraction: share of expert rows (< 0: keep all rows of both).
        max_samples: cap on the total after mixing, keeping the ratio (0: none).
        seed: seeds the subsampling.
    """
    n_self, n_expert = mix_counts(len(self_rows), len(expert_rows), expert_fraction=expert_fraction)
    total = n_self + n_expert
    if max_samples and total > max_samples:
        n_expert = round(n_expert * max_samples / total)
        n_self = max_samples - n_expert
    rng = random.Random(seed)
    mixed = _subsample(self_rows, n_self, rng) + _subsample(expert_rows, n_expert, rng)
    stats = {
        "self_distill": n_self,
        "expert": n_expert,
        "total": n_self + n_expert,
        "available": {"self_distill": len(self_rows), "expert": len(expert_rows)},
        "expert_fraction": n_expert / max(1, n_self + n_expert),
    }
    return mixed, stats


def rebase_images(row: Mapping[str, Any], *, src_dir: Path, dst_dir: Path) -> Row:
    """``row`` with relative image paths (relative to ``src_dir``) made relative to ``dst_dir``."""
    images = row.get("images")
    if not images:
        return dict(row)
    rebased = []
    for img in images:
        if isinstance(img, str) and not Path(img).is_absolute():
            img = os.path.relpath((src_dir / img).resolve(), dst_dir.resolve())
        rebased.append(img)
    return {**row, "images": rebased}


def read_sft_rows(paths: Sequence[str | Path], *, dst_dir: Path) -> list[Row]:
    """Rows of several SFT files, image paths rebased onto ``dst_dir``."""
    rows: list[Row] = []
    for path in paths:
        src_dir = Path(path).resolve().parent
        rows += [rebase_images(r, src_dir=src_dir, dst_dir=dst_dir) for r in read_jsonl(path)]
    return rows


def build_sft_mix(
    self_files: Sequence[str | Path],
    expert_files: Sequence[str | Path],
    cfg: PipelineConfig,
    *,
    out_file: str | Path,
) -> dict[str, Any]:
    """Write the mixed SFT dataset to ``out_file`` (atomically); return its counts.

    Args:
        self_files: triage outputs (``self_distill.jsonl``).
        expert_files: expert-stage outputs (``expert.jsonl``).
        cfg: ``expert_fraction``, ``max_sft_samples``, ``seed``.
    """
    out = Path(out_file)
    dst = out.resolve().parent
    mixed, stats = mix_sft_rows(
        read_sft_rows(self_files, dst_dir=dst),
        read_sft_rows(expert_files, dst_dir=dst),
        expert_fraction=cfg.expert_fraction,
        max_samples=cfg.max_sft_samples,
        seed=cfg.seed,
    )
    bad = [r.get("id") for r in mixed if not str(r.get("response") or "").strip()]
    if bad:
        raise ValueError(f"SFT rows without a response: {bad[:5]}")
    atomic_write_jsonl(out, mixed)
    return {**stats, "file": str(out)}
