"""Reading and writing dataset rows as JSONL or Parquet, and the append-only progress log of
work that samples problems (resumable batches)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def read_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield ``(row index, row)``; a JSONL line that is not a JSON object yields an error string.

    Raises:
        ValueError: the file extension is neither JSONL nor Parquet.
    """
    path = Path(path)
    if path.suffix in _JSONL_SUFFIXES:
        yield from _read_jsonl(path)
    elif path.suffix in _PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist())
    else:
        raise ValueError(f"{path}: unknown dataset format (use .jsonl or .parquet)")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with path.open(encoding="utf-8") as f:
        index = 0
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield index, f"line {line_no}: invalid JSON ({err.msg})"
            else:
                yield index, row if isinstance(row, dict) else f"line {line_no}: not an object"
            index += 1


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` one JSON object per line (UTF-8, key order kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_parquet(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as Parquet; ``images`` entries that are bytes are stored embedded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([dict(r) for r in rows]), path)
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
