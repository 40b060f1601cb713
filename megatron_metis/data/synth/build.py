"""Writes a synthetic dataset: train/test split by content, images as PNG, expert solutions.

Layout of ``out_dir`` (``fmt="jsonl"``): ``train.jsonl``, ``test.jsonl``, ``images/<id>.png``
(paths in rows are relative to the JSONL file) and ``manifest.json``. With ``fmt="parquet"``:
``train.parquet`` and ``test.parquet`` with the PNG bytes embedded in ``images``. Every row
carries its expert solution in the ``expert`` field.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_metis.data.io import write_jsonl, write_parquet
from megatron_metis.data.synth.solver import expert_solution
from megatron_metis.data.synth.tasks import CATEGORIES, DIFFICULTIES, SynthProblem, generate


@dataclass(frozen=True)
class SynthSummary:
    """What ``write_synthetic_dataset`` wrote."""

    files: dict[str, Path]
    counts: dict[str, int]


def _png(problem: SynthProblem) -> bytes | None:
    if problem.image is None:
        return None
    buf = io.BytesIO()
    problem.image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def content_key(problem: SynthProblem, png: bytes | None) -> str:
    """Hash of what the model sees (question, choices, image): the unit of the split."""
    digest = hashlib.sha256(problem.question.encode())
    digest.update(b"\x00" + "\x1f".join(problem.choices or ()).encode() + b"\x00")
    digest.update(png or b"")
    return digest.hexdigest()


MAX_DUPLICATES_IN_A_ROW = 2000
"""Consecutive duplicate draws after which a category counts as exhausted."""


def generate_rows(
    n: int,
    *,
    seed: int,
    categories: Sequence[str] = CATEGORIES,
    difficulties: Sequence[int] = DIFFICULTIES,
    exclude_keys: Collection[str] = (),
) -> list[tuple[dict[str, Any], bytes | None]]:
    """``n`` distinct problems as (row without image paths, PNG bytes or None), deterministic.

    Problems whose content key is in ``exclude_keys`` are skipped like duplicates (a new
    prompt pool that must not repeat another set's train or test problems).

    Raises:
        ValueError: bad arguments, or fewer than ``n`` distinct problems exist.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not categories or not difficulties:
        raise ValueError("categories and difficulties must not be empty")
    rng = random.Random(seed)
    rows: list[tuple[dict[str, Any], bytes | None]] = []
    seen: set[str] = set(exclude_keys)
    misses = 0  # duplicates in a row: the category's problem space is used up
    while len(rows) < n:
        category = categories[len(rows) % len(categories)]
        problem = generate(rng, category, rng.choice(list(difficulties)))
        png = _png(problem)
        key = content_key(problem, png)
        if key in seen:
            misses += 1
            if misses > MAX_DUPLICATES_IN_A_ROW:
                raise ValueError(
                    f"could only generate {len(rows)} distinct problems of {n}: category "
                    f"{category!r} at difficulties {list(difficulties)} has no new problems "
                    "(ask for fewer, or add difficulties)"
                )
            continue
        misses = 0
        seen.add(key)
        rows.append((_row(problem, key), png))
    return rows


def _row(problem: SynthProblem, key: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": f"{problem.category}-d{problem.difficulty}-{key[:12]}",
        "question": problem.question,
        "answer": problem.answer,
    }
    if problem.choices:
        row["choices"] = list(problem.choices)
    row.update(
        source="metis-synth",
        category=problem.category,
        difficulty=problem.difficulty,
        expert=expert_solution(problem.category, problem.scene),
        key=key,
    )
    return row


def is_test(key: str, test_frac: float) -> bool:
    """Split rule: a content hash below ``test_frac`` of the hash range goes to test."""
    return int(key[:8], 16) < test_frac * 16**8


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    n: int,
    seed: int,
    test_frac: float = 0.2,
    fmt: Literal["jsonl", "parquet"] = "jsonl",
    categories: Sequence[str] = CATEGORIES,
    difficulties: Sequence[int] = DIFFICULTIES,
    exclude_keys: Collection[str] = (),
) -> SynthSummary:
    """Generate ``n`` problems (none whose key is in ``exclude_keys``) and write the train and
    test files under ``out_dir``."""
    if not 0.0 <= test_frac < 1.0:
        raise ValueError(f"test_frac must be in [0, 1), got {test_frac}")
    out = Path(out_dir)
    rows = generate_rows(
        n, seed=seed, categories=categories, difficulties=difficulties, exclude_keys=exclude_keys
    )
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for row, png in rows:
        if png is not None and fmt == "jsonl":
            image_path = out / "images" / f"{row['id']}.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            image_path.write_bytes(png)
            row["images"] = [f"images/{row['id']}.png"]
        elif png is not None:
            row["images"] = [png]
        splits["test" if is_test(row["key"], test_frac) else "train"].append(row)
    write = write_jsonl if fmt == "jsonl" else write_parquet
    files = {name: write(out / f"{name}.{fmt}", items) for name, items in splits.items()}
    counts = {f"n_{name}": len(items) for name, items in splits.items()}
    counts.update({f"n_{k}": v for k, v in Counter(r["category"] for r, _ in rows).items()})
    manifest = {"seed": seed, "n": n, "test_frac": test_frac, "format": fmt, "counts": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return SynthSummary(files=files, counts=counts)
