"""``metis rl``: the RL incentivisation phase of Metis-RISE (a GRPO variant), on the engine.

One step, as in the paper: sample G responses per prompt with the rollout engine, score them
with the rule-based verifier (accuracy + format), normalise the rewards within each group,
drop the groups whose rewards are all equal (and sample more prompts), update the policy with
the clipped-higher policy loss averaged over tokens, and stream the new weights into the
rollout engine. ``RLPhase.step`` is that step; the named steps it calls live in ``rl_steps``,
and ``loop.run_phase`` runs it (logging, evaluation, checkpoints, export).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack

from megatron_metis.config import ConfigError, MetisConfig
from megatron_metis.data import Problem, load_training_problems
from megatron_metis.parallel import global_count
from megatron_metis.rewards import RewardScorer
from megatron_metis.trainer import rl_steps as steps
from megatron_metis.trainer.loop import run_phase
from megatron_metis.trainer.rollout_io import (
    RolloutSession,
    build_client,
    build_rollout,
    evaluate,
    probe_sample,
)
from megatron_metis.trainer.setup import Runtime, build_policy_model
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
    return run_phase(
        cfg,
        name="rl",
        build=lambda rt, stack, _: RLPhase(rt, stack, scorer=scorer),
        total_updates=cfg.train.max_steps * cfg.grpo.num_update_steps,
    )


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


class RLPhase:
    """The RL phase: its prompts, rollout engine, reward scorer and reference model."""

    def __init__(self, rt: Runtime, stack: ExitStack, *, scorer: RewardScorer | None) -> None:
        cfg = rt.cfg
        self.rt, self.total_steps = rt, cfg.train.max_steps
        self.prompts, self.categories = _my_prompts(rt)
        self.rollout = build_rollout(rt)
        if self.rollout is not None:
            stack.callback(self.rollout.close)
        self.session = RolloutSession(rt, self.rollout, probe_sample(rt))
        self.scorer = scorer  # scoring happens on the generator only
        if self.scorer is None and rt.is_generator:
            self.scorer = stack.enter_context(RewardScorer(cfg.rewards))
        self.client = build_client(rt, self.rollout)
        self.ref_model = _reference_model(rt) if cfg.grpo.kl_coef > 0 else None
        self.warned_truncation = False

    def initial_state(self) -> TrainState:
        seed = self.rt.cfg.run.seed + self.rt.ctx.dp_rank
        return TrainState(phase="rl", cursor=DataCursor(num_items=len(self.prompts), seed=seed))

    def start(self) -> None:
        """Nothing: the first ``RolloutSession.ready`` streams the (started or resumed) policy."""

    def step(self, state: TrainState) -> dict[str, float]:
        """weight sync (when the policy changed) -> generate -> score -> filter -> advantages
        -> old/reference log-probs -> update. Engines generate where they live; scores and the
        dynamic-sampling decisions come from the generator rank (``rl_steps.collect_rollouts``)."""
        rt, cfg = self.rt, self.rt.cfg
        t_start = time.perf_counter()
        assert state.cursor is not None
        sync_metrics = self.session.ready()
        t_rollout = time.perf_counter()
        # dynamic sampling: rounds of generate -> score -> filter until the batch is full
        batch = steps.collect_rollouts(
            rt,
            self.client,
            self.scorer,
            self.prompts,
            state.cursor,
            step=state.step,
            categories=self.categories,
        )
        self.session.release()  # free the accelerator for the update (vLLM sleep mode)
        state.cursor = batch.cursor
        samples = steps.build_samples(batch, self.client, cfg)  # group-normalised advantages
        metrics = steps.rollout_metrics(rt, batch) | sync_metrics
        self.warn_truncation(metrics)
        t_train = time.perf_counter()
        train_tokens = 0.0
        if global_count(rt.ctx, len(samples)) == 0:  # every group of every replica filtered
            metrics.update({"updates_applied": 0.0, "updates_skipped_empty_batch": 1.0})
        else:
            minibatches = steps.minibatch_microbatches(rt, samples, cfg.grpo.num_update_steps)
            steps.attach_old_and_ref_logprobs(rt, minibatches, self.ref_model)
            sums = steps.update_policy(rt, samples, minibatches, step=state.step)
            metrics.update(steps.update_metrics(sums, cfg.grpo.num_update_steps))
            metrics["updates_skipped_empty_batch"] = 0.0
            train_tokens = global_count(rt.ctx, sum(len(s) for s in samples))
        if metrics["updates_applied"]:
            self.session.policy_changed()  # streamed before the next generation
        state.step += 1
        state.consumed_samples += int(metrics["groups/sampled"])
        end = time.perf_counter()
        train_s = end - t_train
        metrics.update(
            {
                "time/weight_sync": t_rollout - t_start,
                "time/train": train_s,
                "time/step": end - t_start,
                "tokens_per_s/train": train_tokens / max(train_s, 1e-9),
            }
        )
        return metrics

    def warn_truncation(self, metrics: dict[str, float]) -> None:
        """Once per run, on the logging rank."""
        warning = steps.truncation_warning(metrics, self.rt.cfg)
        if warning and not self.warned_truncation and self.rt.is_logger:
            log.warning(warning)
            self.warned_truncation = True

    def evaluate(self, problems: Sequence[Problem]) -> dict[str, float]:
        """Held-out accuracy of the policy after this step (streamed first if it changed)."""
        self.session.ready()
        metrics = evaluate(self.rt, self.client, self.scorer, problems)
        self.session.release()
        return metrics


def _reference_model(rt: Runtime):
    """The frozen starting policy, for the KL penalty (only built when ``grpo.kl_coef > 0``)."""
    model, _ = build_policy_model(rt.cfg, rt.ctx, rt.hf_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
