"""The problem format: one row per problem, in JSONL or Parquet.

Row fields:
    id (str, required, unique), question (str, required), answer (str, required, non-empty),
    images (list, optional): each a path relative to the dataset file, or embedded PNG/JPEG bytes
        (Parquet binary, or ``{"bytes": ...}`` as Hugging Face datasets write them),
    choices (list[str], optional): texts of choices A, B, ... (the answer is then a letter),
    source, category (str, optional), difficulty (int, optional),
    expert (str, optional): an expert solution ``<think>..</think><answer>..\\boxed{}..</answer>``.
The modality is derived: ``image`` when a row has images, else ``text``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

ImageSource = str | bytes
"""An absolute image path, or the encoded bytes of an image."""

_REQUIRED = ("id", "question", "answer")


class RowError(ValueError):
    """A dataset row is invalid; ``reason`` says why."""

    def __init__(self, row_id: str, reason: str) -> None:
        super().__init__(f"row {row_id!r}: {reason}")
        self.row_id = row_id
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One problem with a verifiable answer."""

    id: str
    question: str
    answer: str
    images: tuple[ImageSource, ...] = ()
    choices: tuple[str, ...] | None = None
    source: str = ""
    category: str = ""
    difficulty: int | None = None
    expert: str | None = None
    """Expert solution (the stand-in for the paper's external expert), if the dataset has one."""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def modality(self) -> Literal["image", "text"]:
        return "image" if self.images else "text"

    def load_images(self) -> list[Image.Image]:
        """The images, decoded and converted to RGB."""
        return [open_image(src) for src in self.images]


def open_image(src: ImageSource) -> Image.Image:
    """Decode one image source fully (so a truncated file fails here, not later)."""
    image = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    image.load()
    return image.convert("RGB")


def row_id(row: Mapping[str, Any], index: int) -> str:
    """The row's id, or ``#<index>`` when it has none."""
    value = row.get("id")
    return str(value) if value not in (None, "") else f"#{index}"


def problem_from_row(row: Mapping[str, Any], *, base_dir: Path, index: int) -> Problem:
    """Validate the fields of ``row`` and build a ``Problem`` (images are resolved, not read).

    Raises:
        RowError: a required field is missing or empty, or a field has the wrong type.
    """
    rid = row_id(row, index)
    for key in _REQUIRED:
        value = row.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise RowError(rid, f"missing or empty field '{key}'")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise RowError(rid, f"field '{key}' must be a string, got {type(value).__name__}")
    choices = row.get("choices")
    if choices is not None and (
        not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices)
    ):
        raise RowError(rid, "field 'choices' must be a list of strings")
    difficulty = row.get("difficulty")
    if difficulty is not None and (not isinstance(difficulty, int) or isinstance(difficulty, bool)):
        raise RowError(rid, "field 'difficulty' must be an integer")
    known = {*_REQUIRED, "images", "choices", "source", "category", "difficulty", "expert"}
    return Problem(
        id=rid,
        question=str(row["question"]),
        answer=str(row["answer"]).strip(),
        images=_image_sources(row.get("images"), base_dir, rid),
        choices=tuple(choices) if choices else None,
        source=str(row.get("source") or ""),
        category=str(row.get("category") or ""),
        difficulty=difficulty,
        expert=row.get("expert") or None,
        extra={k: v for k, v in row.items() if k not in known},
    )


def _image_sources(raw: Any, base_dir: Path, rid: str) -> tuple[ImageSource, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str | bytes | dict):
        raw = [raw]
    if not isinstance(raw, list | tuple):
        raise RowError(rid, f"field 'images' must be a list, got {type(raw).__name__}")
    sources: list[ImageSource] = []
    for item in raw:
        if isinstance(item, dict):  # Hugging Face datasets: {"bytes": ..., "path": ...}
            item = item.get("bytes") or item.get("path")
        if isinstance(item, bytes) and item:
            sources.append(item)
        elif isinstance(item, str) and item:
            path = Path(item)
            sources.append(str(path if path.is_absolute() else base_dir / path))
        else:
            raise RowError(rid, f"bad image entry of type {type(item).__name__}")
    return tuple(sources)
