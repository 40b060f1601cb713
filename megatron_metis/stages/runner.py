"""Resumable stages: atomic writes, append-only progress files, and a skip-when-done runner.

A stage owns one folder. It is done when ``<folder>/DONE`` exists; that marker is written last,
atomically, after every output, so a stage killed at any point is either done or re-run (and a
re-run continues from its progress file or cache where it has one). Every output file is
written to a temporary name in the same folder and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

DONE_MARKER = "DONE"
T = TypeVar("T")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line, written atomically."""
    text = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows)
    return atomic_write_text(path, text)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Binary counterpart of ``atomic_write_text`` (images, plots)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a last line cut short by a crash is ignored (logged)."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Iterate the rows of a JSONL file (see ``read_jsonl``)."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                logger.warning("%s: ignoring a truncated last line", path)
                return
            raise


class ProgressLog:
    """Append-only JSONL of finished work items, keyed by ``key``: the resume point of a stage.

    Each ``append`` writes whole lines and flushes them to disk; a crash can at worst cut the
    last line, which ``load`` ignores (and ``truncate_partial`` removes before appending).
    """

    def __init__(self, path: str | Path, *, key: str = "id") -> None:
        self.path = Path(path)
        self.key = key

    def load(self) -> dict[str, dict[str, Any]]:
        """Finished items by key (a later line for the same key wins)."""
        return {str(row[self.key]): row for row in iter_jsonl(self.path)}

    def truncate_partial(self) -> None:
        """Drop a last line cut short by a crash, so appends start on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as f:
                f.truncate(cut)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ``rows`` and fsync."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.truncate_partial()
        text = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def is_done(stage_dir: str | Path) -> bool:
    """Whether the stage in ``stage_dir`` finished (its marker exists)."""
    return (Path(stage_dir) / DONE_MARKER).is_file()


def mark_done(stage_dir: str | Path, summary: Mapping[str, Any] | None = None) -> Path:
    """Write the stage's marker (with an optional JSON summary), atomically, last."""
    payload = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(summary or {})}
    return atomic_write_json(Path(stage_dir) / DONE_MARKER, payload)


def read_done(stage_dir: str | Path) -> dict[str, Any]:
    """The summary stored in the stage's marker."""
    return json.loads((Path(stage_dir) / DONE_MARKER).read_text())


def run_stage(
    name: str,
    stage_dir: str | Path,
    fn: Callable[[Path], Mapping[str, Any] | None],
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Run ``fn(stage_dir)`` unless the stage is done; mark it done when ``fn`` returns.

    Args:
        name: the stage's name (logs).
        stage_dir: the stage's folder (created); ``fn`` writes its outputs there.
        fn: does the work (resuming from its own progress files if it has any) and returns a
            JSON-serialisable summary stored in the marker.
        force: run even when done (the old marker is removed first).

    Returns:
        The marker's summary (the stored one when the stage was skipped), plus
        ``skipped: bool``.
    """
    stage_dir = Path(stage_dir)
    if force:
        (stage_dir / DONE_MARKER).unlink(missing_ok=True)
    if is_done(stage_dir):
        logger.info("stage %s: done already (%s), skipped", name, stage_dir)
        return {**read_done(stage_dir), "skipped": True}
    stage_dir.mkdir(parents=True, exist_ok=True)
    logger.info("stage %s: running in %s", name, stage_dir)
    start = time.monotonic()
    summary = dict(fn(stage_dir) or {})
    summary = {"stage": name, "seconds": round(time.monotonic() - start, 3), **summary}
    mark_done(stage_dir, summary)
    return {**read_done(stage_dir), "skipped": False}
