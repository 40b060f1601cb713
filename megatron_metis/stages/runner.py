"""Resumable stages: atomic writes and a skip-when-done runner (the append-only progress log
of sampled problems is ``data.io.ProgressLog``).

A stage owns one folder. It is done when ``<folder>/DONE`` exists; that marker is written last,
atomically, after every output, so a stage killed at any point is either done or re-run (and a
re-run continues from its progress file or cache where it has one). Every output file is
written to a temporary name in the same folder and renamed, so a reader never sees half a file.

A stage can record its inputs (the config keys it reads, digests of its data files and of the
stages it builds on) in ``<folder>/INPUTS.json`` before it starts. When a rerun asks for other
inputs (an edited recipe, regenerated data, an upstream stage that was redone) the folder is
stale: it is moved aside to ``<folder>.replaced-<k>`` (nothing is deleted) and the stage is
redone from scratch; so are the stages after it, whose inputs include its digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from megatron_metis.config.loader import to_plain

logger = logging.getLogger(__name__)

DONE_MARKER = "DONE"
INPUTS_FILE = "INPUTS.json"
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


def file_digest(path: str | Path) -> str:
    """A short content hash of a file (``"missing"`` when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def stage_digest(stage_dir: str | Path) -> str | None:
    """A short hash of a finished stage's inputs and marker (None when ``stage_dir`` is not a
    finished stage, e.g. a user's own checkpoint folder).

    The marker holds the finish time, so a stage that was redone gets a new digest even with the
    same inputs: the stages built on its old outputs see it in their own inputs.
    """
    stage_dir = Path(stage_dir)
    if not is_done(stage_dir):
        return None
    h = hashlib.sha256((stage_dir / DONE_MARKER).read_bytes())
    if (stage_dir / INPUTS_FILE).is_file():
        h.update((stage_dir / INPUTS_FILE).read_bytes())
    return h.hexdigest()[:16]


def _canonical(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``inputs`` as the JSON it is stored as (paths and other objects as strings)."""
    return json.loads(json.dumps(to_plain(dict(inputs)), sort_keys=True, default=str))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): obj}


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """The keys whose values differ, as ``key: old -> new`` (at most ``limit`` of them)."""
    a, b = _flatten(dict(old)), _flatten(dict(new))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    shown = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"... and {len(keys) - limit} more")
    return "; ".join(shown)


def _is_stage_folder(stage_dir: Path) -> bool:
    return is_done(stage_dir) or (stage_dir / INPUTS_FILE).is_file()


def move_aside(stage_dir: str | Path) -> Path:
    """Rename ``stage_dir`` to the first free ``<name>.replaced-<k>``; returns the new path."""
    stage_dir = Path(stage_dir)
    if not stage_dir.name:  # "." or a path ending in ".."
        stage_dir = stage_dir.resolve()
    k = 1
    while (target := stage_dir.with_name(f"{stage_dir.name}.replaced-{k}")).exists():
        k += 1
    stage_dir.rename(target)
    return target


def run_stage(
    name: str,
    stage_dir: str | Path,
    fn: Callable[[Path], Mapping[str, Any] | None],
    *,
    force: bool = False,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``fn(stage_dir)`` unless the stage is done with the same inputs; mark it done when
    ``fn`` returns.

    Args:
        name: the stage's name (logs).
        stage_dir: the stage's folder (created); ``fn`` writes its outputs there.
        fn: does the work (resuming from its own progress files if it has any) and returns a
            JSON-serialisable summary stored in the marker.
        force: redo the stage from scratch even when it is done (a stage folder, one with a
            marker or recorded inputs, is moved aside first; another folder only loses its
            marker).
        inputs: what the stage's outputs depend on, recorded in ``INPUTS.json``. A stage folder
            whose recorded inputs differ, or that recorded none, is moved aside and the stage
            redone. None: no check (the folder is trusted).

    Returns:
        The marker's summary (the stored one when the stage was skipped), plus
        ``skipped: bool``.
    """
    stage_dir = Path(stage_dir)
    wanted = _canonical(inputs) if inputs is not None else None
    if force and _is_stage_folder(stage_dir):
        logger.info("stage %s: --force, old folder kept as %s", name, move_aside(stage_dir))
    elif force:
        (stage_dir / DONE_MARKER).unlink(missing_ok=True)
    elif wanted is not None and _is_stage_folder(stage_dir):
        recorded_file = stage_dir / INPUTS_FILE
        recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else None
        if recorded != wanted:
            why = describe_changes(recorded, wanted) if recorded else "it recorded no inputs"
            old = move_aside(stage_dir)
            logger.warning(
                "stage %s: inputs changed (%s); redone, old folder kept as %s", name, why, old
            )
    if is_done(stage_dir):
        logger.info("stage %s: done already (%s), skipped", name, stage_dir)
        return {**read_done(stage_dir), "skipped": True}
    stage_dir.mkdir(parents=True, exist_ok=True)
    if wanted is not None:
        atomic_write_json(stage_dir / INPUTS_FILE, wanted)
    logger.info("stage %s: running in %s", name, stage_dir)
    start = time.monotonic()
    summary = dict(fn(stage_dir) or {})
    summary = {"stage": name, "seconds": round(time.monotonic() - start, 3), **summary}
    mark_done(stage_dir, summary)
    return {**read_done(stage_dir), "skipped": False}
