"""Does a GRPO update move the policy toward the rewarded responses, at this learning rate?

``probe_updates`` samples one rollout batch with the recipe's settings, then applies ``updates``
optimizer steps to that same batch. After each step it measures, with the trainer's own
forward, how the summed log-prob of every response changed, and reports the mean change of the
responses with positive and with negative advantage and the correlation of the change with the
advantage. A sound update raises the first and lowers the second. A learning rate at which the
positive responses lose log-prob after a few steps on the batch they were rewarded in is too
large for the model: RL runs at that rate drift instead of learning.

Single process (``parallel.tp = pp = 1``); ``tools/grpo_update_probe.py`` is the command line.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace

import torch

from megatron_metis.config import MetisConfig
from megatron_metis.data import load_training_problems
from megatron_metis.rewards import RewardScorer
from megatron_metis.trainer import rl_steps as steps
from megatron_metis.trainer.batching import Sample
from megatron_metis.trainer.rollout_io import (
    RolloutSession,
    build_client,
    build_rollout,
    probe_sample,
)
from megatron_metis.trainer.setup import Runtime, build_runtime
from megatron_metis.trainer.state import DataCursor


def probe_updates(
    cfg: MetisConfig, *, updates: int, scorer: RewardScorer | None = None
) -> list[dict[str, float]]:
    """One rollout batch, ``updates`` optimizer steps on it; one row of measurements per step.

    Row keys: ``update`` (1..), ``dlogp_pos`` / ``dlogp_neg`` (mean change of the summed
    response log-prob since before the first step, over the responses with advantage > 0 /
    < 0), ``corr`` (correlation of that change with the advantage), ``responses``, ``groups``.
    An all-filtered batch returns no rows.
    """
    if cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp != 1:
        raise ValueError("the update probe runs on one process: set parallel.tp=pp=cp=1")
    cfg = replace(cfg, grpo=replace(cfg.grpo, num_update_steps=1))
    rt, _ = build_runtime(cfg, phase="rl", total_steps=updates)
    problems = load_training_problems(list(cfg.data.train_files), cfg.data, rt.tokenizer)
    with ExitStack() as stack:
        rollout = build_rollout(rt)
        assert rollout is not None  # the only rank is the generator
        stack.callback(rollout.close)
        scorer = scorer or stack.enter_context(RewardScorer(cfg.rewards))
        client = build_client(rt, rollout)
        session = RolloutSession(rt, rollout, probe_sample(rt))
        session.ready()
        cursor = DataCursor(num_items=len(problems), seed=cfg.run.seed)
        batch = steps.collect_rollouts(rt, client, scorer, problems, cursor, step=0)
        session.release()
    samples = steps.build_samples(batch, client, cfg)
    if not samples:
        return []
    advantage_N = torch.tensor([float(s.values["advantage"][0]) for s in samples])
    before_N = response_logprobs(rt, samples)
    rows = []
    for k in range(updates):
        minibatches = steps.minibatch_microbatches(rt, samples, 1)
        steps.update_policy(rt, samples, minibatches, step=k)
        change_N = response_logprobs(rt, samples) - before_N
        rows.append(
            {
                "update": float(k + 1),
                "dlogp_pos": float(change_N[advantage_N > 0].mean()),
                "dlogp_neg": float(change_N[advantage_N < 0].mean()),
                "corr": float(torch.corrcoef(torch.stack([change_N, advantage_N]))[0, 1]),
                "responses": float(len(samples)),
                "groups": float(len(batch.groups)),
            }
        )
    return rows


def response_logprobs(rt: Runtime, samples: list[Sample]) -> torch.Tensor:
    """The trainer's summed log-prob of each sample's response tokens, in sample order."""
    minibatches = steps.minibatch_microbatches(rt, samples, 1)
    steps.attach_logprobs(
        rt.engine, rt.engine.ddp, minibatches, "probe", steps.temperature_of(rt.cfg)
    )
    total_N = torch.zeros(len(samples), dtype=torch.float64)
    for _, inputs in minibatches[0]:
        masked_BS = (inputs["probe"] * inputs["loss_mask"]).double()
        total_N.index_add_(0, inputs["seq_ids"].flatten(), masked_BS.flatten())
    return total_N
