"""Training checkpoints: model, optimizer, RNG, data position and step, resumed automatically;
and the Hugging Face export of the trained policy at the end of a phase.

Layout under ``<run.output_dir>/checkpoints/``::

    step_0000005/
        metis_checkpoint.json     step, architecture, the ``TrainState`` (``extra.train_state``)
        model/                    Megatron distributed checkpoint (loadable at another TP/PP)
        optim/                    CPU: ``rank_00000.pt`` per rank (torch optimizer state);
                                  GPU: Megatron's sharded optimizer state (dist checkpointing)
        rank_state/rank_00000.pt  per-rank RNG states and data cursor
        hf_config/                config / tokenizer / processor files of the HF model
    latest                        name of the newest complete checkpoint

A checkpoint is written to a hidden ``.step_XXXXXXX.partial`` folder and renamed when complete,
and ``latest`` is replaced atomically after that, so a run killed at any moment leaves either
the previous or the new checkpoint, never a half one. Rerunning the same command resumes from
``latest`` (or from ``checkpoint.load_dir``). ``checkpoint.keep_last`` prunes older ones.
Resuming needs the same TP/PP/DP layout for the optimizer and RNG state (the model alone can
be loaded at any layout).

``export_hf`` writes ``<run.output_dir>/hf``: the policy in the Hugging Face layout, which the
next phase, vLLM and transformers load.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_metis.checkpoint import save_hf_checkpoint
from megatron_metis.checkpoint.dist_ckpt import (
    load_model_checkpoint,
    read_checkpoint_meta,
    save_model_checkpoint,
)
from megatron_metis.checkpoint.hf_io import CheckpointError
from megatron_metis.trainer.engine import TrainEngine
from megatron_metis.trainer.state import TrainState, rng_state, set_rng_state

_STEP_DIR = re.compile(r"^step_(\d{7})$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.pt"


def _sharded_optimizer(engine: TrainEngine) -> bool:
    return hasattr(engine.optimizer, "sharded_state_dict")


def save_train_checkpoint(
    engine: TrainEngine,
    state: TrainState,
    output_dir: str | Path,
    *,
    hf_dir: str | Path | None,
    keep_last: int,
) -> Path:
    """Collective: write ``step_<state.step>`` (model, optimizer, RNG, state); prune old ones."""
    root = checkpoints_dir(output_dir)
    ckpt_dir = root / f"step_{state.step:07d}"
    rank = engine.ctx.rank

    def write_extra(staging: Path) -> None:
        for sub in ("optim", "rank_state"):
            (staging / sub).mkdir(exist_ok=True)
        if _sharded_optimizer(engine):
            from megatron.core import dist_checkpointing

            model_sd = engine.module.sharded_state_dict()
            dist.barrier()
            dist_checkpointing.save(
                engine.optimizer.sharded_state_dict(model_sd), str(staging / "optim")
            )
        else:
            torch.save(engine.optimizer.state_dict(), _rank_file(staging / "optim", rank))
        rank_state = {"rng": rng_state(), "train_state": state.to_json()}
        torch.save(rank_state, _rank_file(staging / "rank_state", rank))

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    save_model_checkpoint(
        engine.module,
        engine.ctx,
        ckpt_dir,
        arch=engine.arch,
        step=state.step,
        hf_dir=hf_dir,
        extra={"train_state": state.to_json()},
        write_extra=write_extra,
    )
    if rank == 0:
        tmp = root / ".latest.tmp"
        tmp.write_text(ckpt_dir.name + "\n")
        os.replace(tmp, root / "latest")
        _prune(root, keep_last)
    dist.barrier()
    return ckpt_dir


def export_hf(
    engine: TrainEngine, output_dir: str | Path, *, hf_dir: str | Path, max_shard_size_mb: int
) -> Path:
    """Collective: write ``<output_dir>/hf``, the trained policy as a HF checkpoint (the next
    phase's input), with the config, tokenizer and processor files of ``hf_dir``."""
    out = Path(output_dir) / "hf"
    save_hf_checkpoint(
        engine.module,
        engine.ctx,
        engine.arch,
        out,
        side_files_from=hf_dir,
        max_shard_bytes=max_shard_size_mb * 2**20,
        overwrite=True,
    )
    return out


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (``latest``, else the highest step), or None."""
    root = checkpoints_dir(output_dir)
    pointer = root / "latest"
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if (candidate / "metis_checkpoint.json").exists():
            return candidate
    if not root.exists():
        return None
    complete = [
        p
        for p in root.iterdir()
        if _STEP_DIR.match(p.name) and (p / "metis_checkpoint.json").exists()
    ]
    return max(complete, default=None)


def load_train_checkpoint(engine: TrainEngine, ckpt_dir: str | Path) -> TrainState:
    """Collective: restore model, optimizer and this rank's RNG; returns the ``TrainState``."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_checkpoint_meta(ckpt_dir)
    saved = meta.get("saved_with", {})
    ctx = engine.ctx
    layout = {"tp": ctx.tp, "pp": ctx.pp, "cp": ctx.cp, "dp": ctx.dp}
    if any(saved.get(k) != v for k, v in layout.items()):
        raise CheckpointError(
            f"{ckpt_dir} was saved at {saved}; resuming training needs the same layout "
            f"(this run: {layout}); convert it and start a new run to change the layout"
        )
    load_model_checkpoint(engine.module, ctx, ckpt_dir, arch=engine.arch)
    if _sharded_optimizer(engine):
        from megatron.core import dist_checkpointing

        model_sd = engine.module.sharded_state_dict()
        opt_sd = engine.optimizer.sharded_state_dict(model_sd)
        engine.optimizer.load_state_dict(dist_checkpointing.load(opt_sd, str(ckpt_dir / "optim")))
    else:
        engine.optimizer.load_state_dict(_load(_rank_file(ckpt_dir / "optim", ctx.rank)))
    rank_state: dict[str, Any] = _load(_rank_file(ckpt_dir / "rank_state", ctx.rank))
    set_rng_state(rank_state["rng"])
    dist.barrier()
    return TrainState.from_json(rank_state["train_state"])


def _load(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    return torch.load(path, map_location="cpu", weights_only=False)
