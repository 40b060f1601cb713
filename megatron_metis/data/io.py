"""Reading and writing dataset rows as JSONL or Parquet."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

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
