"""Training checkpoints with ``megatron.core.dist_checkpointing``: saved at one TP/PP, loadable at
another.

Layout of a checkpoint folder::

    <dir>/metis_checkpoint.json   format version, step, architecture (checked before loading)
    <dir>/model/                  Megatron distributed checkpoint of the model
    <dir>/extra/                  optional per-phase state written by the trainer
    <dir>/hf_config/              config, tokenizer and processor files of the HF model

Saving goes to ``.<name>.partial`` and is renamed at the end, so a crash leaves no folder that
looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_metis.checkpoint.hf_io import CheckpointError, copy_side_files
from megatron_metis.models.arch import Qwen2Arch
from megatron_metis.parallel import ParallelContext

FORMAT_VERSION = 1
META_NAME = "metis_checkpoint.json"


def _partial_dir(ckpt_dir: Path) -> Path:
    return ckpt_dir.with_name(f".{ckpt_dir.name}.partial")


def save_model_checkpoint(
    model: torch.nn.Module,
    ctx: ParallelContext,
    ckpt_dir: str | Path,
    *,
    arch: Qwen2Arch,
    step: int = 0,
    hf_dir: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: save the model's sharded state under ``ckpt_dir`` (replaced if it exists).

    ``write_extra(staging_dir)`` runs on every rank after the model is written and before the
    folder is renamed into place (the trainer adds optimizer and RNG state there), so the
    whole training checkpoint appears atomically.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    staging = _partial_dir(ckpt_dir)
    if ctx.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "model").mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(staging / "model"))
    if write_extra is not None:
        write_extra(staging)
    dist.barrier()
    if ctx.rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "arch": dataclasses.asdict(arch),
            "saved_with": {"tp": ctx.tp, "pp": ctx.pp, "cp": ctx.cp, "dp": ctx.dp},
            "extra": extra or {},
        }
        if hf_dir is not None:
            (staging / "hf_config").mkdir()
            copy_side_files(hf_dir, staging / "hf_config")
        (staging / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        os.replace(staging, ckpt_dir)
    dist.barrier()
    return ckpt_dir


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The metadata of a complete checkpoint; raises ``CheckpointError`` if it is not one."""
    path = Path(ckpt_dir) / META_NAME
    if not path.exists():
        raise CheckpointError(
            f"{ckpt_dir} is not a complete megatron_metis checkpoint (no {META_NAME})"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version {meta.get('format_version')}")
    return meta


def check_architecture(meta: dict[str, Any], arch: Qwen2Arch, ckpt_dir: str | Path) -> None:
    """Compare the saved architecture with the model's and name every field that differs."""
    saved = meta["arch"]
    current = dataclasses.asdict(arch)
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r} vs model {current[key]!r}"
        for key in current
        if _norm(saved.get(key)) != _norm(current[key])
    ]
    if diffs:
        raise CheckpointError(f"{ckpt_dir} does not match the model: " + "; ".join(diffs))


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def load_model_checkpoint(
    model: torch.nn.Module, ctx: ParallelContext, ckpt_dir: str | Path, *, arch: Qwen2Arch
) -> dict[str, Any]:
    """Collective: load ``ckpt_dir`` into ``model`` at this run's TP/PP; returns its metadata."""
    from megatron.core import dist_checkpointing

    meta = read_checkpoint_meta(ckpt_dir)
    check_architecture(meta, arch, ckpt_dir)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(Path(ckpt_dir) / "model"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "_extra_state" not in k]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: missing {missing}, unexpected {unexpected}")
    return meta
