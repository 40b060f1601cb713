"""Dataset validation (`metis data check`) and the loader that training uses.

A row is bad when a required field is missing or empty, a field has the wrong type, an image is
missing or unreadable, its id repeats an earlier row's, or its prompt (system + user turn +
image tokens) is longer than ``max_prompt_tokens``. Training stops at the first bad row
(``on_bad_row: error``) or skips and counts them (``skip``), logging each one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from transformers import PreTrainedTokenizerBase

from megatron_metis.config.data import DataConfig
from megatron_metis.data.io import read_rows
from megatron_metis.data.messages import count_prompt_tokens
from megatron_metis.data.schema import Problem, RowError, open_image, problem_from_row

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset has a bad row and the config says to stop."""


@dataclass(frozen=True)
class BadRow:
    """A row that failed validation."""

    file: str
    index: int
    id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.index} (id {self.id}): {self.reason}"


@dataclass
class LoadResult:
    """Problems of one or more files, and the rows that were skipped."""

    problems: list[Problem] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)
    n_rows: int = 0

    @property
    def n_skipped(self) -> int:
        return len(self.bad_rows)


def iter_checked(
    path: str | Path, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None
) -> Iterator[Problem | BadRow]:
    """Every row of ``path`` as a validated ``Problem`` or a ``BadRow`` with the reason.

    Args:
        path: a JSONL or Parquet dataset.
        cfg: the data config (system prompt, prompt token limit, image pixel bounds).
        tokenizer: counts prompt tokens; None skips the length check.
    """
    path = Path(path)
    seen: set[str] = set()
    for index, row in read_rows(path):
        if isinstance(row, str):
            yield BadRow(str(path), index, f"#{index}", row)
            continue
        try:
            problem = problem_from_row(row, base_dir=path.parent, index=index)
            if problem.id in seen:
                raise RowError(problem.id, "duplicate id")
            seen.add(problem.id)
            _check_problem(problem, cfg, tokenizer)
        except RowError as err:
            yield BadRow(str(path), index, err.row_id, err.reason)
        else:
            yield problem


def _check_problem(
    problem: Problem, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    sizes = []
    for i, src in enumerate(problem.images):
        if isinstance(src, str) and not Path(src).is_file():
            raise RowError(problem.id, f"image {i} not found: {src}")
        try:
            sizes.append(_image_size(src))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise RowError(problem.id, f"image {i} unreadable: {err}") from err
    if tokenizer is None:
        return
    n_tokens = count_prompt_tokens(
        tokenizer,
        problem,
        system_prompt=cfg.system_prompt,
        image_sizes=sizes,
        min_pixels=cfg.image_min_pixels,
        max_pixels=cfg.image_max_pixels,
    )
    if n_tokens > cfg.max_prompt_tokens:
        raise RowError(
            problem.id, f"prompt has {n_tokens} tokens > max_prompt_tokens {cfg.max_prompt_tokens}"
        )


def _image_size(src: str | bytes) -> tuple[int, int]:
    return open_image(src).size


def check_files(
    paths: Sequence[str | Path], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None
) -> LoadResult:
    """Validate every row of ``paths``; bad rows are collected, never raised."""
    result = LoadResult()
    for path in paths:
        for item in iter_checked(path, cfg, tokenizer):
            result.n_rows += 1
            if isinstance(item, BadRow):
                result.bad_rows.append(item)
            else:
                result.problems.append(item)
    return result


def load_training_problems(
    paths: Sequence[str | Path], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None
) -> list[Problem]:
    """``load_problems`` of training files, keeping the rows of ``cfg.train_modality``.

    Raises:
        DatasetError: as ``load_problems``, or when no row of that modality is left.
    """
    problems = load_problems(paths, cfg, tokenizer).problems
    if cfg.train_modality == "all":
        return problems
    kept = [p for p in problems if p.modality == cfg.train_modality]
    logger.info(
        "data.train_modality=%s: %d of %d training rows",
        cfg.train_modality,
        len(kept),
        len(problems),
    )
    if not kept:
        names = ", ".join(str(p) for p in paths)
        raise DatasetError(f"data.train_modality={cfg.train_modality}: no such rows in {names}")
    return kept


def load_problems(
    paths: Sequence[str | Path], cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None
) -> LoadResult:
    """Load datasets for training, following ``cfg.on_bad_row``.

    Raises:
        DatasetError: at the first bad row when ``cfg.on_bad_row`` is ``error``.
    """
    result = LoadResult()
    for path in paths:
        for item in iter_checked(path, cfg, tokenizer):
            result.n_rows += 1
            if isinstance(item, Problem):
                result.problems.append(item)
                continue
            if cfg.on_bad_row == "error":
                raise DatasetError(f"{item} (set data.on_bad_row=skip to skip bad rows)")
            logger.warning("skipping bad row: %s", item)
            result.bad_rows.append(item)
    if result.bad_rows:
        logger.warning("skipped %d of %d rows", result.n_skipped, result.n_rows)
    return result
