"""``metis rl``: the RL incentivisation phase of Metis-RISE (a GRPO variant), on the engine.

One step, as in the paper: sample G responses per prompt with the rollout engine, score them
with the rule-based verifier (accuracy + format), normalise the rewards within each group,
drop the groups whose rewards are all equal (and sample more prompts), update the policy with
the clipped-higher policy loss averaged over tokens, and stream the new weights into the
rollout engine. The named steps live in ``rl_steps``; this module is the loop.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from typing import Any

from megatron_metis.config import ConfigError, MetisConfig
from megatron_metis.data import Problem, load_problems, load_training_problems
from megatron_metis.parallel import broadcast_from_generator, global_count
from megatron_metis.rewards import RewardScorer
from megatron_metis.trainer import rl_steps as steps
from megatron_metis.trainer.checkpointing import save_train_checkpoint
from megatron_metis.trainer.metrics import MetricsLogger
from megatron_metis.trainer.rollout_io import (
    build_client,
    build_rollout,
    evaluate,
    probe_sample,
    sync_weights,
)
from megatron_metis.trainer.setup import Runtime, build_runtime
from megatron_metis.trainer.sft import export_hf
from megatron_metis.trainer.state import DataCursor, TrainState

log = logging.getLogger(__name__)


def run_rl(cfg: MetisConfig, *, scorer: RewardScorer | None = None) -> dict[str, float]:
    """The RL phase (call on every rank); returns the last step's metrics.

    Args:
        cfg: the run's config.
        scorer: a reward scorer to use instead of ``RewardScorer(cfg.rewards)`` (tests).
    """
    if cfg.train.max_steps < 1:
        raise ConfigError("metis rl needs train.max_steps >= 1 (rollout steps)")
    if not cfg.data.train_files:
        raise ConfigError("metis rl needs data.train_files")
    total_updates = cfg.train.max_steps * cfg.grpo.num_update_steps
    rt, state = build_runtime(cfg, phase="rl", total_steps=total_updates)
    prompts, categories = _my_prompts(rt)
    state = state or TrainState(
        phase="rl", cursor=DataCursor(num_items=len(prompts), seed=cfg.run.seed + rt.ctx.dp_rank)
    )
    with ExitStack() as stack:
        loop = _RLLoop(rt, stack, prompts, scorer, categories)
        final = loop.run(state)
    export_hf(rt)
    return final


MAX_LOGGED_CATEGORIES = 32
"""Per-category training accuracy is logged when the training set has at most this many."""


def _my_prompts(rt: Runtime) -> tuple[list[Problem], list[str]]:
    """This data-parallel replica's shard of the training prompts, and the categories of the
    whole training set (the same list on every rank) whose accuracy is logged per step."""
    problems = load_training_problems(list(rt.cfg.data.train_files), rt.cfg.data, rt.tokenizer)
    mine = problems[rt.ctx.dp_rank :: rt.ctx.dp]
    if not mine:
        raise ValueError("no training prompts for this data-parallel rank")
    categories = sorted({p.category for p in problems if p.category})
    return mine, categories if len(categories) <= MAX_LOGGED_CATEGORIES else []


class _RLLoop:
    """The rollout engine, reward scorer, reference model and logger of one RL run."""

    def __init__(
        self,
        rt: Runtime,
        stack: ExitStack,
        prompts: list[Problem],
        scorer: RewardScorer | None,
        categories: list[str],
    ) -> None:
        cfg = rt.cfg
        self.rt, self.prompts, self.categories = rt, prompts, categories
        self.rollout = build_rollout(rt)
        self.scorer = scorer
        if self.scorer is None and self.rollout is not None:
            self.scorer = stack.enter_context(RewardScorer(cfg.rewards))
        self.client = build_client(rt, self.rollout)
        self.probe = probe_sample(rt)
        self.ref_model = _reference_model(rt) if cfg.grpo.kl_coef > 0 else None
        self.test_problems = _test_problems(rt)
        self.warned_truncation = False

    def run(self, state: TrainState) -> dict[str, float]:
        cfg, rt = self.rt.cfg, self.rt
        logger = MetricsLogger(
            cfg.run.output_dir,
            cfg.logging,
            phase="rl",
            total_steps=cfg.train.max_steps,
            initial_step=state.step,
            enabled=rt.is_logger,
        )
        sync_weights(rt, self.rollout, self.probe)  # start (or resume) from the trainer's weights
        metrics: dict[str, float] = {}
        while state.step < cfg.train.max_steps:
            metrics = self.step(state)
            logger.log(state.step, metrics, force=state.step == cfg.train.max_steps)
            self.maybe_save(state)
        logger.close()
        return metrics

    def step(self, state: TrainState) -> dict[str, float]:
        """rollout -> rewards -> advantages -> filtering -> update -> weight stream."""
        start = time.perf_counter()
        batch = self.collect(state)
        samples = steps.build_samples(batch, self.client, self.rt.cfg)
        metrics = steps.rollout_metrics(self.rt, batch)
        self.warn_truncation(metrics)
        t_train = time.perf_counter()
        metrics.update(self.update(samples, state.step))
        t_sync = time.perf_counter()
        if metrics["updates_applied"]:
            metrics.update(sync_weights(self.rt, self.rollout, self.probe))
        state.step += 1
        state.consumed_samples += int(metrics["groups/sampled"])
        if self.eval_due(state.step):
            metrics.update(self.evaluate())
        end = time.perf_counter()
        metrics.update(
            {
                "time/train": t_sync - t_train,
                "time/weight_sync": end - t_sync,
                "time/step": end - start,
                "tokens_per_s/train": metrics.pop("_train_tokens", 0.0)
                / max(t_sync - t_train, 1e-9),
            }
        )
        return metrics

    def collect(self, state: TrainState) -> steps.RolloutBatch:
        """Generate and score on the generator rank; the batch goes to its model-parallel group."""
        batch = None
        if self.rollout is not None and self.scorer is not None:
            assert state.cursor is not None
            self.rollout.wake()  # awake after a weight stream; asleep after a skipped update
            batch = steps.collect_rollouts(
                self.rt,
                self.client,
                self.scorer,
                self.prompts,
                state.cursor,
                step=state.step,
                categories=self.categories,
            )
            self.rollout.sleep()  # free the accelerator for the update (vLLM sleep mode)
        batch = broadcast_from_generator(self.rt.ctx, batch)
        state.cursor = batch.cursor
        return batch

    def warn_truncation(self, metrics: dict[str, float]) -> None:
        """Once per run, on the logging rank."""
        warning = steps.truncation_warning(metrics, self.rt.cfg)
        if warning and not self.warned_truncation and self.rt.is_logger:
            log.warning(warning)
            self.warned_truncation = True

    def update(self, samples: list[Any], step: int) -> dict[str, float]:
        """Policy update, or a skipped one when every group of every replica was filtered."""
        ctx = self.rt.ctx
        if global_count(ctx, len(samples)) == 0:
            return {"updates_applied": 0.0, "updates_skipped_empty_batch": 1.0}
        sums = steps.update_policy(self.rt, samples, step=step, ref_model=self.ref_model)
        metrics = steps.update_metrics(sums, self.rt.cfg.grpo.num_update_steps)
        metrics["updates_skipped_empty_batch"] = 0.0
        metrics["_train_tokens"] = global_count(ctx, sum(len(s) for s in samples))
        return metrics

    def eval_due(self, step: int) -> bool:
        interval, last = self.rt.cfg.train.eval_interval, self.rt.cfg.train.max_steps
        return bool(self.test_problems) and (step == last or (interval and step % interval == 0))

    def evaluate(self) -> dict[str, float]:
        if self.rollout is not None:
            self.rollout.wake()
        return evaluate(self.rt, self.client, self.scorer, self.test_problems)

    def maybe_save(self, state: TrainState) -> None:
        cfg = self.rt.cfg
        interval = cfg.checkpoint.save_interval
        if state.step == cfg.train.max_steps or (interval and state.step % interval == 0):
            save_train_checkpoint(
                self.rt.engine,
                state,
                cfg.run.output_dir,
                hf_dir=self.rt.hf_dir,
                keep_last=cfg.checkpoint.keep_last,
            )


def _test_problems(rt: Runtime) -> list[Problem]:
    cfg = rt.cfg
    if not cfg.data.test_files:
        return []
    loaded = load_problems(list(cfg.data.test_files), cfg.data, rt.tokenizer)
    return loaded.problems[: cfg.train.eval_max_problems or len(loaded.problems)]


def _reference_model(rt: Runtime):
    """The frozen starting policy, for the KL penalty (only built when ``grpo.kl_coef > 0``)."""
    from megatron_metis.checkpoint import load_hf_weights
    from megatron_metis.models import build_model, read_hf_config

    model, arch = build_model(read_hf_config(rt.hf_dir), rt.ctx, rt.cfg.model, source=rt.hf_dir)
    load_hf_weights(model, rt.ctx, arch, rt.hf_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
