"""Reading and writing Hugging Face safetensors checkpoints, tensor by tensor.

Reading is lazy (``safe_open``): a rank reads only the tensors, and only the rows or columns of
them, that its TP shard and PP stage need. Writing streams (name, tensor) pairs into shards of
bounded size inside a temporary folder that is renamed into place at the end, so a crash never
leaves a half-written folder that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files that make a folder loadable by transformers and vLLM besides the weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit the model; the message names the file
    or tensor."""


class HFCheckpointReader:
    """Lazy access to the tensors of a Hugging Face checkpoint folder (one file or an index)."""

    def __init__(self, hf_dir: str | Path):
        self.hf_dir = Path(hf_dir)
        self._handles: dict[str, object] = {}
        self._file_of = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.hf_dir / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
            return dict(weight_map)
        single = self.hf_dir / SINGLE_NAME
        if not single.exists():
            raise CheckpointError(f"{self.hf_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} exists")
        return {name: SINGLE_NAME for name in self._open(SINGLE_NAME).keys()}

    def _open(self, filename: str):
        if filename not in self._handles:
            path = self.hf_dir / filename
            if not path.exists():
                raise CheckpointError(f"{path}: file listed in the checkpoint is missing")
            try:
                self._handles[filename] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
        return self._handles[filename]

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _slice(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"{self.hf_dir}: tensor {name!r} is missing from the checkpoint")
        return self._open(self._file_of[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, *, rows: slice | None = None, cols: slice | None = None):
        """Read ``name`` (or only ``rows`` / ``cols`` of it) from disk."""
        part = self._slice(name)
        try:
            if rows is None and cols is None:
                return part[:]
            if cols is None:
                return part[rows]
            return part[rows if rows is not None else slice(None), cols]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{self.hf_dir}: cannot read tensor {name!r} ({err})") from err


def copy_side_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy config, tokenizer, processor and generation files; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src_dir) / name).exists():
            shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)
            copied.append(name)
    return copied


class AtomicDir:
    """A temporary sibling folder that replaces ``target`` on ``commit()`` (and vanishes if not)."""

    def __init__(self, target: str | Path, *, overwrite: bool = False):
        self.target = Path(target)
        if self.target.exists() and not overwrite:
            raise CheckpointError(f"{self.target} already exists (pass overwrite to replace it)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(
            tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent)
        )

    def commit(self) -> Path:
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
            os.replace(self.path, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.target)
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> AtomicDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_safetensors_shards(
    named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, *, max_shard_bytes: int
) -> dict[str, str]:
    """Write tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most
    ``max_shard_bytes`` (a single larger tensor gets a shard of its own) plus the index.
    Holds at most one shard in memory. Returns the weight map."""
    out_dir = Path(out_dir)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, files, weight_map, total = 0, [], {}, 0
    for name, tensor in named_tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            files.append(_flush(shard, out_dir, len(files)))
            shard, shard_bytes = {}, 0
        shard[name] = tensor.detach().to("cpu").contiguous()
        shard_bytes += size
        total += size
    if shard:
        files.append(_flush(shard, out_dir, len(files)))
    for i, (tmp_name, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(out_dir / tmp_name, out_dir / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def _flush(shard: dict[str, torch.Tensor], out_dir: Path, i: int) -> tuple[str, list[str]]:
    name = f"shard-{i:05d}.partial"
    save_file(shard, str(out_dir / name), metadata={"format": "pt"})
    return name, list(shard)
