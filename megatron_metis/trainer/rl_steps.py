"""The named steps of the RL loop (``trainer.rl``): rollout, scoring, advantages, update.

Generation runs where the rollout engines live (``hf``: the generator rank of each
data-parallel replica; ``vllm``: every rank, in step), over the replica's shard of the prompts.
Scoring runs on the generator alone, and each sampling round's scored groups are broadcast to
the rest of the replica's model-parallel group before anything depends on them, so every rank
takes the same dynamic-sampling decisions, makes the same ``generate`` calls and builds the same
training samples.

Legend: B groups (prompts), G responses per group, N = B * G responses.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_metis.algorithms import DynamicSampler, group_advantages, grpo_loss, shape_rewards
from megatron_metis.config import MetisConfig
from megatron_metis.data import Problem
from megatron_metis.models.forward import Microbatch, gather_positions, run_pipeline
from megatron_metis.parallel import (
    broadcast_from_generator,
    from_last_stage,
    max_over_dp,
    sum_over_dp,
)
from megatron_metis.rewards import RewardScorer
from megatron_metis.rollout import Completion, logprob_temperature
from megatron_metis.rollout.client import RolloutClient, sampling_params
from megatron_metis.trainer.batching import Sample, global_loss_normalisers, pack_rows
from megatron_metis.trainer.engine import LossFn, TrainEngine
from megatron_metis.trainer.setup import Runtime
from megatron_metis.trainer.state import DataCursor


@dataclass
class Group:
    """One prompt and its G scored responses."""

    problem: Problem
    completions: list[Completion]
    rewards: list[float]
    """Shaped rewards (verifier reward + overlong penalty)."""
    accuracy: list[float]
    """The verifier's 0/1 accuracy of each response (``grpo.filter_on='accuracy'``)."""
    keep: list[bool]
    """False for responses left out of the loss (``grpo.overlong='mask'`` and truncated)."""


@dataclass
class RolloutBatch:
    """What the generator hands to the trainer: the kept groups and the rollout metrics."""

    groups: list[Group]
    cursor: DataCursor
    sums: dict[str, float] = field(default_factory=dict)
    """Additive counters (summed over DP before they become metrics)."""
    maxima: dict[str, float] = field(default_factory=dict)


def temperature_of(cfg: MetisConfig) -> float:
    """Temperature of the trainer's log-probs: the rollout engine's (``logprob_temperature``)."""
    return logprob_temperature(cfg.rollout.temperature)


def generate_and_score(
    rt: Runtime,
    client: RolloutClient,
    scorer: RewardScorer | None,
    problems: Sequence[Problem],
    *,
    seed: int,
    categories: Sequence[str] = (),
) -> tuple[list[Group], dict[str, float], dict[str, float]]:
    """Sample G responses per problem, score them, shape the rewards; one sampling round.

    Every rank of the replica calls it: ranks with an engine generate, the generator scores,
    and its result is what every rank returns.

    ``categories``: the training set's problem categories; the sums get per-category response
    and correct counts for each (zeros included, so every data-parallel rank has the same keys).
    """
    g = rt.cfg.grpo.group_size
    t0 = time.perf_counter()
    completions = None
    if client.engine is not None:
        completions = client.generate(problems, sampling_params(rt.cfg.rollout, n=g, seed=seed))
    result = None
    if rt.is_generator:
        assert completions is not None and scorer is not None, "the generator has no engine"
        result = _score_round(rt, client, scorer, problems, completions, categories, t0)
    return broadcast_from_generator(rt.ctx, result)


def _score_round(
    rt: Runtime,
    client: RolloutClient,
    scorer: RewardScorer,
    problems: Sequence[Problem],
    completions: list[Completion],
    categories: Sequence[str],
    t0: float,
) -> tuple[list[Group], dict[str, float], dict[str, float]]:
    cfg = rt.cfg
    g = cfg.grpo.group_size
    t1 = time.perf_counter()
    # RL rewards have always been computed on the text as decoded (end-of-turn token included)
    scores = client.score(problems, completions, scorer, raw_text=True)
    t2 = time.perf_counter()
    lengths_N = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
    truncated_N = torch.tensor([c.truncated for c in completions])
    rewards_N, keep_N, shape_m = shape_rewards(
        torch.tensor(scores.rewards),
        lengths_N,
        truncated_N,
        cfg=cfg.grpo,
        max_new_tokens=cfg.rollout.max_new_tokens,
    )
    groups = [
        Group(
            problem=p,
            completions=completions[b * g : (b + 1) * g],
            rewards=rewards_N[b * g : (b + 1) * g].tolist(),
            accuracy=[float(a) for a in scores.accuracy[b * g : (b + 1) * g]],
            keep=keep_N[b * g : (b + 1) * g].tolist(),
        )
        for b, p in enumerate(problems)
    ]
    sums = {
        "responses": float(len(completions)),
        "reward": float(rewards_N.sum()),
        "accuracy": float(sum(scores.accuracy)),
        "format": float(sum(scores.format)),
        "response_tokens": float(lengths_N.sum()),
        "truncated": shape_m["num_truncated"],
        "masked": shape_m["num_masked"],
        "verifier_timeouts": float(scores.metrics.get("n_timeout", 0.0)),
        "verifier_errors": float(scores.metrics.get("n_verifier_error", 0.0)),
        "time_generate": t1 - t0,
        "time_reward": t2 - t1,
    } | _category_counts(problems, scores.accuracy, g, categories)
    maxima = {"response_length_max": float(lengths_N.max()) if len(completions) else 0.0}
    return groups, sums, maxima


def _category_counts(
    problems: Sequence[Problem],
    accuracy_N: Sequence[float],
    group_size: int,
    categories: Sequence[str],
) -> dict[str, float]:
    """Responses and correct responses of each category (zeros included)."""
    counts: dict[str, float] = {}
    for category in categories:
        counts[f"responses_of:{category}"] = 0.0
        counts[f"correct_of:{category}"] = 0.0
    for n, problem in enumerate(p for p in problems for _ in range(group_size)):
        if problem.category in categories:
            counts[f"responses_of:{problem.category}"] += 1.0
            counts[f"correct_of:{problem.category}"] += float(accuracy_N[n])
    return counts


def collect_rollouts(
    rt: Runtime,
    client: RolloutClient,
    scorer: RewardScorer | None,
    prompts: Sequence[Problem],
    cursor: DataCursor,
    *,
    step: int,
    categories: Sequence[str] = (),
) -> RolloutBatch:
    """Dynamic sampling: rounds of generate + score until the batch of groups whose rewards
    (``grpo.filter_on=accuracy``: accuracies) differ is full, or ``grpo.max_sampling_rounds``
    is reached (a short batch is trained). Every rank calls it and takes the same decisions:
    each round's scores come from the generator (``generate_and_score``)."""
    cfg = rt.cfg.grpo
    sampler: DynamicSampler[Group] = DynamicSampler(
        target_groups=max(cfg.num_prompts_per_step // rt.ctx.dp, 1),
        max_rounds=cfg.max_sampling_rounds,
        enabled=cfg.dynamic_sampling,
    )
    sums: dict[str, float] = {}
    maxima: dict[str, float] = {}
    round_ = 0
    while not sampler.done:
        problems = [prompts[i] for i in cursor.take(sampler.groups_needed)]
        seed = rt.cfg.rollout.seed + 1_000_003 * rt.ctx.dp_rank + 1009 * step + round_
        groups, round_sums, round_max = generate_and_score(
            rt, client, scorer, problems, seed=seed, categories=categories
        )
        rewards_BG = torch.tensor([grp.rewards for grp in groups])
        accuracy_BG = torch.tensor([grp.accuracy for grp in groups])
        filter_BG = accuracy_BG if cfg.filter_on == "accuracy" else None
        sampler.add(groups, rewards_BG, filter_BG=filter_BG)
        sums = {k: sums.get(k, 0.0) + v for k, v in round_sums.items()}
        maxima = {k: max(maxima.get(k, 0.0), v) for k, v in round_max.items()}
        round_ += 1
    groups, _, sampler_metrics = sampler.take()
    sums.update({f"groups_{k}": v for k, v in _sampler_counts(sampler_metrics).items()})
    return RolloutBatch(groups=groups, cursor=cursor, sums=sums, maxima=maxima)


def _sampler_counts(metrics: Mapping[str, float]) -> dict[str, float]:
    return {
        "sampled": metrics["groups_sampled"],
        "filtered": metrics["groups_dropped"],
        "kept": metrics["groups_kept"],
        "rounds": metrics["sampling_rounds"],
        "batch_full": metrics["batch_full"],
    }


def build_samples(batch: RolloutBatch, client: RolloutClient, cfg: MetisConfig) -> list[Sample]:
    """Prompt + response token sequences with their group-normalised advantages."""
    if not batch.groups:
        return []
    rewards_BG = torch.tensor([grp.rewards for grp in batch.groups])
    adv_BG = group_advantages(rewards_BG, eps=cfg.grpo.adv_eps, norm_std=cfg.grpo.norm_std)
    samples: list[Sample] = []
    for b, grp in enumerate(batch.groups):
        req = client.request(grp.problem)
        prompt_L = torch.tensor(list(req.prompt_ids), dtype=torch.long)
        mm = req.mm_inputs or {}
        for i, completion in enumerate(grp.completions):
            resp_L = torch.tensor(completion.token_ids, dtype=torch.long)
            target_L = torch.cat(
                [
                    torch.zeros(len(prompt_L), dtype=torch.bool),
                    torch.full((len(resp_L),), bool(grp.keep[i])),
                ]
            )
            ids_L = torch.cat([prompt_L, resp_L])
            rollout_lp_L = torch.zeros(len(ids_L))
            if len(completion.logprobs) == len(resp_L):
                rollout_lp_L[len(prompt_L) :] = torch.tensor(completion.logprobs)
            samples.append(
                Sample(
                    token_ids_L=ids_L,
                    target_mask_L=target_L,
                    values={
                        "advantage": torch.full((len(ids_L),), float(adv_BG[b, i])),
                        "rollout_logprob": rollout_lp_L,
                    },
                    pixel_values_PC=mm.get("pixel_values"),
                    image_grid_thw_N3=mm.get("image_grid_thw"),
                    index=len(samples),
                )
            )
    return samples


def minibatch_microbatches(
    rt: Runtime, samples: Sequence[Sample], num_minibatches: int
) -> list[list[Microbatch]]:
    """Split the responses into mini-batches (one optimizer step each) of packed micro-batches.

    A replica with no response for a mini-batch gets one empty row (it still takes part in
    the collectives of the step).
    """
    cfg = rt.cfg
    budget = cfg.train.max_tokens_per_row or max((len(s) for s in samples), default=8)
    out = []
    for part in _minibatch_samples(samples, num_minibatches):
        rows = pack_rows(part, max_tokens=budget, pack=cfg.train.pack_sequences) if part else []
        out.append(rt.microbatches(rows))
    return out


def _minibatch_samples(samples: Sequence[Sample], num_minibatches: int) -> list[list[Sample]]:
    """``samples`` cut into ``num_minibatches`` consecutive parts (the last ones may be empty)."""
    per = -(-len(samples) // num_minibatches) if samples else 0
    return [list(samples[k * per : (k + 1) * per]) for k in range(num_minibatches)]


def attach_logprobs(
    engine: TrainEngine,
    model: torch.nn.Module,
    minibatches: Sequence[Sequence[Microbatch]],
    key: str,
    temperature: float,
) -> None:
    """Forward-only pass of ``model`` over every micro-batch; stores its log-probs ``[b, S]``
    in the micro-batch's loss inputs under ``key`` (on the last stage, where the loss runs).

    ``model`` gives logits or hidden states, as it was built (``setup.build_policy_model``:
    under ``train.logprob_impl=fused`` the reference model's log-probs skip the logits too).
    """

    def fn(output, inputs):
        lp, _ = engine.logprobs(output, inputs["labels"], temperature=temperature, model=model)
        return gather_positions(lp.detach(), engine.ctx)

    for mbs in minibatches:
        model.eval()
        with torch.no_grad():
            outs = run_pipeline(model, engine.ctx, list(mbs), fn, forward_only=True)
        for (_, loss_inputs), logprobs in zip(mbs, outs, strict=False):
            loss_inputs[key] = logprobs


def grpo_loss_fn(engine: TrainEngine, cfg: MetisConfig, norms: Mapping[str, float]) -> LossFn:
    """Loss of one micro-batch: the clipped policy loss (+ KL), globally normalised.

    The loss function receives the last stage's output, logits or (``train.logprob_impl=fused``)
    hidden states, and ``engine.logprobs`` turns either into per-token log-probs: with
    ``fused`` the kernel computes them from the hidden states and the output weight shard,
    and its backward gives the gradients of both without the logits. The objective on top
    is ``algorithms.grpo_loss`` in both modes, the one GRPO objective: ``[T]``-sized ops (its
    gradient over the fused and over the reference log-probs is parity-tested in
    ``tests/kernels`` and ``tests/unit/algorithms``), with the KL term and the metrics the
    trainer reports.
    """
    temperature = temperature_of(cfg)

    def loss_fn(output, inputs):
        logprobs, entropy = engine.logprobs(output, inputs["labels"], temperature=temperature)
        mask = inputs["loss_mask"]
        loss, metrics = grpo_loss(
            logprobs,
            inputs.get("old_logprobs", logprobs.detach()),
            inputs["value:advantage"],
            mask,
            cfg=cfg.grpo,
            num_global_tokens=norms["tokens"],
            num_global_seqs=norms["seqs"],
            seq_ids=inputs["seq_ids"],
            ref_logprobs=inputs.get("ref_logprobs"),
        )
        n = metrics["num_tokens"]
        out = {
            "tokens": n,
            "clip_frac": metrics["clip_frac"] * n,
            "entropy": (entropy * mask).sum(),
            "pg_loss": metrics["pg_loss"],
        }
        if "value:rollout_logprob" in inputs:  # samples built from rollouts (build_samples)
            gap = (logprobs.detach() - inputs["value:rollout_logprob"]).abs()
            out["rollout_logprob_gap"] = (gap * mask).sum()
        if "kl" in metrics:
            out["kl"] = metrics["kl"] * n
        return loss, {k: float(v.detach()) for k, v in out.items()}

    return loss_fn


def attach_old_and_ref_logprobs(
    rt: Runtime,
    minibatches: Sequence[Sequence[Microbatch]],
    ref_model: torch.nn.Module | None,
) -> None:
    """The frozen log-probs the loss compares against, before the first update: the behaviour
    policy's (``old_logprobs``; only with ``grpo.num_update_steps > 1``, the later updates are
    off-policy) and the reference model's (``ref_logprobs``, for the KL term)."""
    engine, temperature = rt.engine, temperature_of(rt.cfg)
    if len(minibatches) > 1:
        attach_logprobs(engine, engine.ddp, minibatches, "old_logprobs", temperature)
    if ref_model is not None:
        attach_logprobs(engine, ref_model, minibatches, "ref_logprobs", temperature)


def update_policy(
    rt: Runtime,
    samples: Sequence[Sample],
    minibatches: Sequence[Sequence[Microbatch]],
    *,
    step: int,
) -> dict[str, Any]:
    """One optimizer step per mini-batch (``minibatch_microbatches`` of ``samples``: the
    ``grpo.num_update_steps`` updates of rollout step ``step``); returns summed metrics."""
    cfg, engine = rt.cfg, rt.engine
    n_updates = len(minibatches)
    parts = _minibatch_samples(samples, n_updates)
    sums: dict[str, float] = {"grad_norm": 0.0, "updates_applied": 0.0, "lr": 0.0}
    for k, (part, mbs) in enumerate(zip(parts, minibatches, strict=True)):
        norms = global_loss_normalisers(rt.ctx, part)
        out = engine.train_step(mbs, grpo_loss_fn(engine, cfg, norms), step * n_updates + k)
        local: dict[str, float] = {}
        for m in out.microbatch_metrics:
            for key, value in m.items():
                local[key] = local.get(key, 0.0) + value
        local = sum_over_dp(rt.ctx, from_last_stage(rt.ctx, local), with_cp=True)
        for key, value in local.items():
            sums[key] = sums.get(key, 0.0) + value
        sums["grad_norm"] += out.grad_norm / n_updates
        sums["updates_applied"] += float(out.applied)
        sums["lr"] = out.lr
    return sums


def rollout_metrics(rt: Runtime, batch: RolloutBatch) -> dict[str, float]:
    """Means over all sampled responses of the step (filtered groups included)."""
    sums = sum_over_dp(rt.ctx, batch.sums)
    maxima = max_over_dp(rt.ctx, batch.maxima)
    n = max(sums.get("responses", 0.0), 1.0)
    per_category = {
        f"accuracy/{key.split(':', 1)[1]}": sums[f"correct_of:{key.split(':', 1)[1]}"] / count
        for key, count in sums.items()
        if key.startswith("responses_of:") and count > 0
    }
    return per_category | {
        "reward/mean": sums.get("reward", 0.0) / n,
        "accuracy": sums.get("accuracy", 0.0) / n,
        "format_rate": sums.get("format", 0.0) / n,
        "response_length/mean": sums.get("response_tokens", 0.0) / n,
        "response_length/max": maxima.get("response_length_max", 0.0),
        "num_responses": sums.get("responses", 0.0),
        "num_truncated": sums.get("truncated", 0.0),
        "num_masked": sums.get("masked", 0.0),
        "verifier/timeouts": sums.get("verifier_timeouts", 0.0),
        "verifier/errors": sums.get("verifier_errors", 0.0),
        "groups/sampled": sums.get("groups_sampled", 0.0),
        "groups/filtered": sums.get("groups_filtered", 0.0),
        "groups/kept": sums.get("groups_kept", 0.0),
        "groups/sampling_rounds": sums.get("groups_rounds", 0.0) / rt.ctx.dp,
        "groups/batch_full": sums.get("groups_batch_full", 0.0) / rt.ctx.dp,
        "tokens_per_s/rollout": sums.get("response_tokens", 0.0)
        / max(sums.get("time_generate", 0.0) / rt.ctx.dp, 1e-9),
        "time/generate": sums.get("time_generate", 0.0) / rt.ctx.dp,
        "time/reward": sums.get("time_reward", 0.0) / rt.ctx.dp,
    }


def update_metrics(sums: Mapping[str, float], n_updates: int) -> dict[str, float]:
    tokens = max(sums.get("tokens", 0.0), 1.0)
    out = {
        "loss": sums.get("pg_loss", 0.0) / n_updates,
        "clip_frac": sums.get("clip_frac", 0.0) / tokens,
        "entropy": sums.get("entropy", 0.0) / tokens,
        "grad_norm": sums.get("grad_norm", 0.0),
        "lr": sums.get("lr", 0.0),
        "updates_applied": sums.get("updates_applied", 0.0),
        "num_loss_tokens": sums.get("tokens", 0.0) / n_updates,
    }
    # mean |trainer - rollout engine| log-prob of the response tokens: ~0 on-policy when both
    # see the same weights and inputs (images included); it grows with later updates
    if "rollout_logprob_gap" in sums:
        out["rollout_logprob_gap"] = sums["rollout_logprob_gap"] / tokens
    if "kl" in sums:
        out["kl"] = sums["kl"] / tokens
    return out


TRUNCATION_WARN_SHARE = 0.05


def truncation_warning(metrics: Mapping[str, float], cfg: MetisConfig) -> str | None:
    """A warning when many responses hit ``rollout.max_new_tokens`` and still train.

    A cut response has no answer, so it scores 0 however good its reasoning was; with
    ``grpo.overlong='none'`` its negative advantage teaches the policy to write shorter
    reasoning, on exactly the problems that need long reasoning (on the tiny recipe, a 64-token
    limit under the 71-token solutions of 9-shape count scenes made RL lower count accuracy).
    """
    n = metrics.get("num_responses", 0.0)
    cut = metrics.get("num_truncated", 0.0)
    if n <= 0 or cut / n <= TRUNCATION_WARN_SHARE or cfg.grpo.overlong != "none":
        return None
    return (
        f"{cut / n:.0%} of this step's responses hit rollout.max_new_tokens="
        f"{cfg.rollout.max_new_tokens} and score 0 with no answer; they train the policy to "
        "write shorter responses. Raise rollout.max_new_tokens or set grpo.overlong=mask."
    )
