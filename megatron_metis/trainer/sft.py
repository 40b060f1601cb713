"""``metis sft``: supervised fine-tuning on assistant tokens, on the training engine.

Each step takes ``sft.global_batch_size`` conversations (epoch-shuffled, split over the DP
ranks), packs them into rows, and takes one optimizer step on the NLL of the assistant tokens
normalised by their global count (all micro-batches, all DP ranks). ``SFTPhase.step`` is that
step; ``loop.run_phase`` runs it, with checkpoints every ``checkpoint.save_interval`` steps
(rerunning the command resumes from the latest).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack

from megatron_metis.algorithms import sft_loss
from megatron_metis.config import MetisConfig
from megatron_metis.data import Problem
from megatron_metis.parallel import from_last_stage, global_count, sum_over_dp
from megatron_metis.rewards import RewardScorer
from megatron_metis.trainer.batching import Sample, global_loss_normalisers, pack_rows
from megatron_metis.trainer.engine import LossFn, TrainEngine
from megatron_metis.trainer.loop import run_phase
from megatron_metis.trainer.rollout_io import (
    RolloutSession,
    build_client,
    build_rollout,
    evaluate,
    probe_sample,
)
from megatron_metis.trainer.setup import Runtime
from megatron_metis.trainer.sft_data import load_sft_dataset
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
    return pack_rows(samples, max_tokens=budget, pack=cfg.train.pack_sequences)


def sft_step(rt: Runtime, samples: list[Sample], step: int) -> dict[str, float]:
    """One optimizer step on this rank's share of the batch; returns the step's metrics."""
    start = time.perf_counter()
    engine, cfg = rt.engine, rt.cfg
    norms = global_loss_normalisers(rt.ctx, samples)
    rows = step_rows(cfg, samples)
    out = engine.train_step(rt.microbatches(rows), sft_loss_fn(engine, cfg, norms), step)
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
        "num_rows": float(max(len(rows), 1)),  # no rows: the step trains one placeholder row
        "tokens_per_s/train": total_tokens / seconds,
        "time/train_step": seconds,
    }


def total_sft_steps(cfg: MetisConfig, num_conversations: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(num_conversations // cfg.sft.global_batch_size, 1) * cfg.sft.epochs


def run_sft(cfg: MetisConfig) -> dict[str, float]:
    """The SFT phase (call on every rank); returns the final metrics (eval included)."""
    if not cfg.data.train_files:
        raise ValueError("metis sft needs data.train_files")
    return run_phase(cfg, name="sft", build=SFTPhase)


class SFTPhase:
    """The SFT phase: its dataset, and the rollout engine of held-out evaluation (built when
    there are held-out problems: the weights are streamed into it at each evaluation)."""

    def __init__(self, rt: Runtime, stack: ExitStack, test_problems: Sequence[Problem]) -> None:
        cfg = rt.cfg
        self.rt = rt
        self.dataset = load_sft_dataset(
            cfg.data.train_files, cfg.data, cfg.sft, processor=rt.processor, chat=rt.chat
        )
        self.total_steps = total_sft_steps(cfg, len(self.dataset))
        rt.engine.total_steps = self.total_steps
        if cfg.sft.global_batch_size % rt.ctx.dp:
            raise ValueError("sft.global_batch_size must be divisible by the data-parallel size")
        self.rollout = build_rollout(rt) if test_problems else None
        if self.rollout is not None:
            stack.callback(self.rollout.close)
        self.session = RolloutSession(rt, self.rollout, probe_sample(rt))
        self.scorer: RewardScorer | None = None
        if self.rollout is not None and rt.is_generator:
            self.scorer = stack.enter_context(RewardScorer(cfg.rewards))
        self.client = build_client(rt, self.rollout)

    def initial_state(self) -> TrainState:
        cfg = self.rt.cfg
        cursor = DataCursor(num_items=len(self.dataset), seed=cfg.run.seed, shuffle=cfg.sft.shuffle)
        return TrainState(phase="sft", cursor=cursor)

    def start(self) -> None:
        pass

    def step(self, state: TrainState) -> dict[str, float]:
        """One optimizer step on the next ``sft.global_batch_size`` conversations."""
        cfg, ctx, dataset = self.rt.cfg, self.rt.ctx, self.dataset
        assert state.cursor is not None
        indices = state.cursor.take(cfg.sft.global_batch_size)
        samples = dataset.samples(indices[ctx.dp_rank :: ctx.dp])
        metrics = sft_step(self.rt, samples, state.step)
        self.session.policy_changed()
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

    def evaluate(self, problems: Sequence[Problem]) -> dict[str, float]:
        """Stream the weights into the rollout engine, decode greedily, put it back to sleep."""
        sync = self.session.ready()
        metrics = evaluate(self.rt, self.client, self.scorer, problems)
        self.session.release()
        return {**metrics, **sync}
