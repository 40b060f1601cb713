"""``metis sft``: supervised fine-tuning on assistant tokens, on the training engine.

Each step takes ``train.global_batch_size`` conversations (epoch-shuffled, split over the DP
ranks), packs them into rows, and takes one optimizer step on the NLL of the assistant tokens
normalised by their global count (all micro-batches, all DP ranks). Checkpoints every
``checkpoint.save_interval`` steps; rerunning the command resumes from the latest.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import torch

from megatron_metis.algorithms import local_loss_normalisers, sft_loss
from megatron_metis.config import MetisConfig
from megatron_metis.parallel import from_last_stage, global_count, sum_over_dp
from megatron_metis.trainer.batching import Sample, build_microbatches, pack_rows
from megatron_metis.trainer.checkpointing import save_train_checkpoint
from megatron_metis.trainer.engine import LossFn, TrainEngine
from megatron_metis.trainer.metrics import MetricsLogger
from megatron_metis.trainer.rollout_io import (
    build_client,
    build_rollout,
    evaluate,
    probe_sample,
    sync_weights,
)
from megatron_metis.trainer.setup import Runtime, build_runtime
from megatron_metis.trainer.sft_data import SFTDataset, load_sft_dataset
from megatron_metis.trainer.state import DataCursor, TrainState


def sft_loss_fn(engine: TrainEngine, cfg: MetisConfig, norms: Mapping[str, float]) -> LossFn:
    """Loss of one micro-batch: NLL of its targets / the global token (or sequence) count."""

    def loss_fn(logits, inputs):
        logprobs, entropy = engine.logprobs(logits, inputs["labels"])
        loss, metrics = sft_loss(
            logprobs,
            inputs["loss_mask"],
            loss_norm=cfg.sft.loss_norm,
            num_global_tokens=norms["tokens"],
            num_global_seqs=norms["seqs"],
            seq_ids=inputs["seq_ids"],
        )
        mask = inputs["loss_mask"]
        metrics["entropy_sum"] = (entropy * mask).sum().detach()
        return loss, metrics

    return loss_fn


def step_rows(cfg: MetisConfig, samples: list[Sample]) -> list[list[Sample]]:
    budget = cfg.train.max_tokens_per_row or cfg.sft.max_seq_len
    return pack_rows(samples, max_tokens=budget, pack=cfg.sft.pack_sequences)


def sft_step(rt: Runtime, samples: list[Sample], step: int) -> dict[str, float]:
    """One optimizer step on this rank's share of the batch; returns the step's metrics."""
    start = time.perf_counter()
    engine, cfg = rt.engine, rt.cfg
    tokens = sum(local_loss_normalisers(s.target_mask_L[1:])[0] for s in samples)
    seqs = sum(1 for s in samples if s.num_targets)
    norms = {"tokens": global_count(rt.ctx, tokens), "seqs": global_count(rt.ctx, seqs)}
    rows = step_rows(cfg, samples) or [[_empty_sample()]]
    mbs = build_microbatches(
        rows,
        micro_batch_size=cfg.train.micro_batch_size,
        pad_id=int(rt.tokenizer.pad_token_id or 0),
        position_fn=engine.position_fn,
        pad_to_multiple=engine.row_multiple,
    )
    out = engine.train_step(mbs, sft_loss_fn(engine, cfg, norms), step)
    sums = {"nll": 0.0, "entropy": 0.0}
    for m in out.microbatch_metrics:
        sums["nll"] += float(m["nll_sum"])
        sums["entropy"] += float(m["entropy_sum"])
    sums = sum_over_dp(rt.ctx, from_last_stage(rt.ctx, sums), with_cp=True)
    seconds = time.perf_counter() - start
    total_tokens = global_count(rt.ctx, sum(len(s) for s in samples))
    return {
        "loss": sums["nll"] / max(norms["tokens"], 1.0),
        "entropy": sums["entropy"] / max(norms["tokens"], 1.0),
        "grad_norm": out.grad_norm,
        "lr": out.lr,
        "update_applied": float(out.applied),
        "num_loss_tokens": norms["tokens"],
        "num_samples": global_count(rt.ctx, len(samples)),
        "num_rows": float(len(rows)),
        "tokens_per_s/train": total_tokens / seconds,
        "time/train_step": seconds,
    }


def _empty_sample() -> Sample:
    ids = torch.zeros(2, dtype=torch.long)
    return Sample(token_ids_L=ids, target_mask_L=torch.zeros(2, dtype=torch.bool))


def total_sft_steps(cfg: MetisConfig, num_conversations: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(num_conversations // cfg.train.global_batch_size, 1) * cfg.sft.epochs


def run_sft(cfg: MetisConfig) -> dict[str, float]:
    """The SFT phase (call on every rank); returns the final metrics (eval included)."""
    if not cfg.data.train_files:
        raise ValueError("metis sft needs data.train_files")
    rt, state = build_runtime(cfg, phase="sft", total_steps=0)
    dataset = load_sft_dataset(
        cfg.data.train_files, cfg.data, cfg.sft, processor=rt.processor, chat=rt.chat
    )
    total = total_sft_steps(cfg, len(dataset))
    rt.engine.total_steps = total
    if cfg.train.global_batch_size % rt.ctx.dp:
        raise ValueError("train.global_batch_size must be divisible by the data-parallel size")
    state = state or TrainState(
        phase="sft",
        cursor=DataCursor(num_items=len(dataset), seed=cfg.run.seed, shuffle=cfg.sft.shuffle),
    )
    logger = MetricsLogger(
        cfg.run.output_dir,
        cfg.logging,
        phase="sft",
        total_steps=total,
        initial_step=state.step,
        enabled=rt.is_logger,
    )
    with ExitStack() as stack:
        evaluator = _Evaluator(rt, stack)
        final: dict[str, float] = {}
        while state.step < total:
            metrics = _train_one(rt, dataset, state)
            if evaluator.due(state.step, total):
                metrics.update(evaluator(state.step))
            logger.log(state.step, metrics, force=state.step == total)
            _maybe_save(rt, state, final=state.step == total)
            final = metrics
        logger.close()
        export_hf(rt)
        return final


def _train_one(rt: Runtime, dataset: SFTDataset, state: TrainState) -> dict[str, float]:
    cfg, ctx = rt.cfg, rt.ctx
    assert state.cursor is not None
    indices = state.cursor.take(cfg.train.global_batch_size)
    samples = dataset.samples(indices[ctx.dp_rank :: ctx.dp])
    metrics = sft_step(rt, samples, state.step)
    state.step += 1
    state.consumed_samples += len(indices)
    metrics.update(
        {
            "epoch": float(state.cursor.epoch),
            "consumed_samples": float(state.consumed_samples),
            "num_truncated": float(dataset.num_truncated),
            "num_too_long": float(dataset.num_too_long),
        }
    )
    return metrics


def _maybe_save(rt: Runtime, state: TrainState, *, final: bool) -> None:
    interval = rt.cfg.checkpoint.save_interval
    if final or (interval and state.step % interval == 0):
        save_train_checkpoint(
            rt.engine,
            state,
            rt.cfg.run.output_dir,
            hf_dir=rt.hf_dir,
            keep_last=rt.cfg.checkpoint.keep_last,
        )


def export_hf(rt: Runtime) -> None:
    """Write ``<output_dir>/hf``: the trained policy as a HF checkpoint (next phase's input)."""
    if not rt.cfg.checkpoint.export_hf:
        return
    from pathlib import Path

    from megatron_metis.checkpoint import save_hf_checkpoint

    save_hf_checkpoint(
        rt.engine.module,
        rt.ctx,
        rt.engine.arch,
        Path(rt.cfg.run.output_dir) / "hf",
        side_files_from=rt.hf_dir,
        max_shard_bytes=rt.cfg.checkpoint.max_shard_size_mb * 2**20,
        overwrite=True,
    )


class _Evaluator:
    """Held-out accuracy during SFT: stream the weights into a rollout engine, decode greedily."""

    def __init__(self, rt: Runtime, stack: ExitStack) -> None:
        from megatron_metis.data import load_problems
        from megatron_metis.rewards import RewardScorer

        self.rt, self.problems = rt, []
        cfg = rt.cfg
        if cfg.data.test_files:
            loaded = load_problems(list(cfg.data.test_files), cfg.data, rt.tokenizer)
            limit = cfg.train.eval_max_problems or len(loaded.problems)
            self.problems = loaded.problems[:limit]
        self.rollout = build_rollout(rt) if self.problems else None
        self.scorer: Any = None
        if self.rollout is not None:
            self.scorer = stack.enter_context(RewardScorer(cfg.rewards))
        self.client = build_client(rt, self.rollout)
        self.probe = probe_sample(rt)

    def due(self, step: int, total: int) -> bool:
        interval = self.rt.cfg.train.eval_interval
        return bool(self.problems) and (step == total or (interval and step % interval == 0))

    def __call__(self, step: int) -> dict[str, float]:
        sync = sync_weights(self.rt, self.rollout, self.probe)
        metrics = evaluate(self.rt, self.client, self.scorer, self.problems)
        if self.rollout is not None:
            self.rollout.sleep()
        return {**metrics, **sync}
