"""Start of a phase: process groups, tokenizer/processor, policy model, engine, resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_metis.algorithms.sft import ChatTokenIds
from megatron_metis.checkpoint import load_hf_weights
from megatron_metis.config import ConfigError, MetisConfig, save_resolved_config
from megatron_metis.models import Qwen2Arch, build_model, read_hf_config
from megatron_metis.models.forward import Microbatch
from megatron_metis.models.specs import use_transformer_engine
from megatron_metis.parallel import ParallelContext, init_parallel
from megatron_metis.trainer.batching import Sample, build_microbatches, empty_sample
from megatron_metis.trainer.checkpointing import find_latest_checkpoint, load_train_checkpoint
from megatron_metis.trainer.engine import TrainEngine
from megatron_metis.trainer.state import TrainState


@dataclass
class Runtime:
    """Everything a phase loop works with."""

    cfg: MetisConfig
    ctx: ParallelContext
    tokenizer: Any
    processor: Any
    chat: ChatTokenIds
    engine: TrainEngine
    hf_dir: Path
    resumed_from: Path | None = None

    @property
    def is_generator(self) -> bool:
        """First rank of this data-parallel replica's model-parallel group (TP 0, stage 0):
        hosts the rollout engine and the reward scorer."""
        return self.ctx.tp_rank == 0 and self.ctx.pp_rank == 0 and self.ctx.cp_rank == 0

    @property
    def is_logger(self) -> bool:
        return self.ctx.rank == 0

    def microbatches(self, rows: list[list[Sample]]) -> list[Microbatch]:
        """The micro-batches of one optimizer step's rows; no rows (nothing to train on for
        this replica) become one row of ``empty_sample``."""
        return build_microbatches(
            rows or [[empty_sample()]],
            micro_batch_size=self.cfg.train.micro_batch_size,
            pad_id=int(self.tokenizer.pad_token_id or 0),
            position_fn=self.engine.position_fn,
            pad_to_multiple=self.engine.row_multiple,
        )


def prepare_hf_dir(cfg: MetisConfig) -> Path:
    """The policy's HF folder; with ``model.init_tiny`` a tiny model is created if missing."""
    hf_dir = Path(cfg.model.hf_dir)
    if cfg.model.init_tiny and not (hf_dir / "config.json").exists():
        from megatron_metis.models.tiny import build_tiny_qwen2_5_vl

        build_tiny_qwen2_5_vl(hf_dir, seed=cfg.run.seed)
    return hf_dir


def check_packing_supported(cfg: MetisConfig, device: torch.device) -> None:
    """Packed rows keep samples apart with an explicit block-causal mask, which Megatron's local
    attention (CPU) applies. Transformer Engine's causal attention ignores that mask; packing
    there needs THD inputs with per-sample ``cu_seqlens``, which the trainer does not build
    yet, so packed samples would attend to each other. Refuse instead of training on that."""
    if cfg.train.pack_sequences and use_transformer_engine(cfg.model, device):
        raise ConfigError(
            "train.pack_sequences=true with Transformer Engine layers: packed samples would attend "
            "to each other (TE's causal attention ignores the block mask; THD packing is not "
            "wired yet). Set train.pack_sequences=false, or model.transformer_impl=local"
        )


def build_policy_model(
    cfg: MetisConfig, ctx: ParallelContext, hf_dir: str | Path
) -> tuple[torch.nn.Module, Qwen2Arch]:
    """This rank's shard of the policy's model with the weights of ``hf_dir``, for the engine
    (and the KL reference model, which must give the same output).

    Its last stage returns what ``TrainEngine.logprobs`` takes under ``train.logprob_impl``:
    hidden states for the fused kernel under ``fused``, logits otherwise.
    """
    module, arch = build_model(
        read_hf_config(hf_dir),
        ctx,
        cfg.model,
        source=hf_dir,
        returns_hidden_states=cfg.train.logprob_impl == "fused",
    )
    load_hf_weights(module, ctx, arch, hf_dir)
    return module, arch


def build_runtime(
    cfg: MetisConfig, *, phase: str, total_steps: int
) -> tuple[Runtime, TrainState | None]:
    """Initialise the parallel layout and the engine; resume from the latest checkpoint.

    Returns the runtime and the resumed ``TrainState`` (None for a fresh start).
    """
    from transformers import AutoTokenizer

    from megatron_metis.data.vl_inputs import build_vl_processor

    ctx = init_parallel(cfg.parallel, seed=cfg.run.seed)
    check_packing_supported(cfg, ctx.device)
    if ctx.rank == 0:
        prepare_hf_dir(cfg)
        save_resolved_config(cfg, Path(cfg.run.output_dir))
    dist.barrier()
    hf_dir = Path(cfg.model.hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    processor = build_vl_processor(
        tokenizer, min_pixels=cfg.data.image_min_pixels, max_pixels=cfg.data.image_max_pixels
    )
    module, arch = build_policy_model(cfg, ctx, hf_dir)
    engine = TrainEngine(module, arch, ctx, cfg, total_steps=total_steps)
    runtime = Runtime(
        cfg=cfg,
        ctx=ctx,
        tokenizer=tokenizer,
        processor=processor,
        chat=ChatTokenIds.from_tokenizer(tokenizer),
        engine=engine,
        hf_dir=hf_dir,
    )
    ckpt = Path(cfg.checkpoint.load_dir) if cfg.checkpoint.load_dir else None
    ckpt = ckpt or find_latest_checkpoint(cfg.run.output_dir)
    if ckpt is None:
        return runtime, None
    state = load_train_checkpoint(engine, ckpt)
    if state.phase != phase:
        raise ValueError(f"{ckpt} is a {state.phase} checkpoint; this is a {phase} run")
    runtime.resumed_from = ckpt
    return runtime, state
