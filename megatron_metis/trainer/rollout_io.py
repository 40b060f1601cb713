"""Between the trainer and the rollout engine: its client, its session, weight streaming and
its checks, eval.

Where engines live: ``hf`` on the generator rank of each data-parallel replica (TP rank 0,
stage 0, CP rank 0; ``Runtime.is_generator``); ``vllm`` on every rank (SPMD, external launcher:
blocks of ``rollout.vllm_tensor_parallel_size`` ranks inside one TP group form one engine, and
they must make the same ``generate`` calls). Scoring, and every decision that depends on a
score, happens on the generator alone and is broadcast to its replica, so no rank's verifier
timeout can make the ranks of one vLLM engine call ``generate`` a different number of times.

Weight streaming is collective: every rank walks the ``export_hf_weights`` stream (the TP/PP
shards are gathered into full HF tensors one at a time), and each engine takes it in one call.
Checks after each stream (``rollout.verify_weights``): ``checksum`` compares per-tensor
checksums; ``logprobs`` compares the engine's log-probs of a probe sequence with the trainer's.
A mismatch raises ``WeightSyncError`` and stops the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megatron_metis.checkpoint import export_hf_weights
from megatron_metis.config import EvalConfig
from megatron_metis.data import Problem
from megatron_metis.models.forward import gather_positions
from megatron_metis.parallel import broadcast_from_generator, from_last_stage, sum_over_dp
from megatron_metis.rewards import RewardScorer
from megatron_metis.rollout import (
    RolloutEngine,
    WeightSyncError,
    build_rollout_engine,
    check_logprobs,
    stream_weights,
)
from megatron_metis.rollout.client import RolloutClient, sampling_params
from megatron_metis.trainer.batching import Sample, build_microbatches
from megatron_metis.trainer.setup import Runtime


def build_rollout(rt: Runtime) -> RolloutEngine | None:
    """The rollout engine: ``hf`` on the generator rank (None elsewhere), ``vllm`` on every
    rank (the module docstring)."""
    if rt.cfg.rollout.backend != "hf":
        pixels = (rt.cfg.data.image_min_pixels, rt.cfg.data.image_max_pixels)
        return build_rollout_engine(
            rt.cfg.rollout, rt.hf_dir, device=rt.ctx.device, image_pixels=pixels
        )
    if not rt.is_generator:
        return None
    from megatron_metis.rollout.hf_engine import HFRolloutEngine

    return HFRolloutEngine.from_pretrained(rt.hf_dir, rt.cfg.rollout, device=rt.ctx.device)


def build_client(rt: Runtime, rollout: RolloutEngine | None) -> RolloutClient:
    """The client of the phase's rollout engine (None on ranks that do not generate: they still
    build requests, for the training samples). Requests are cached: prompts recur."""
    return RolloutClient(
        rollout,
        rt.tokenizer,
        system_prompt=rt.cfg.data.system_prompt,
        processor=rt.processor,
        cache_requests=True,
    )


def trainer_logprobs(rt: Runtime, samples: Sequence[Sample], temperature: float) -> list[Any]:
    """Per-sample log-probs ``[L - 1]`` of tokens 1.. under the trainer (on every rank)."""
    rows = [[s] for s in samples]
    mbs = build_microbatches(
        rows,
        micro_batch_size=1,
        pad_id=0,
        position_fn=rt.engine.position_fn,
        pad_to_multiple=rt.engine.row_multiple,
    )

    def fn(logits, inputs):
        lp, _ = rt.engine.logprobs(logits, inputs["labels"], temperature=temperature)
        return gather_positions(lp.float(), rt.ctx).cpu()

    outs = rt.engine.forward_only(mbs, fn)
    per_sample = [out[0, : len(s) - 1] for out, s in zip(outs, samples, strict=False)]
    return from_last_stage(rt.ctx, per_sample if rt.ctx.is_last_stage else None)


class RolloutSession:
    """The rollout engine across RL steps: whether it holds the policy, awake or asleep.

    ``ready`` before every generation: ``wake(["weights"])`` -> the weight stream, when the
    policy changed since the last one or the engine dropped its weights (vLLM's level-2
    sleep) -> ``wake(["kv_cache"])`` -> the log-prob probe. ``release`` after it (the
    accelerator goes to the training step). Collective: call both on every rank.
    """

    def __init__(self, rt: Runtime, engine: RolloutEngine | None, probe: Sample) -> None:
        self.rt, self.engine, self.probe = rt, engine, probe
        self.stale = True
        """The engine does not hold the current policy (a fresh engine may hold random
        weights; a resumed run's policy is the checkpoint's)."""
        self.release()  # a fresh engine holds its KV cache: the first stream must not

    def policy_changed(self) -> None:
        self.stale = True

    def ready(self) -> dict[str, float]:
        """Make the engine hold the current policy and be awake; the stream's metrics."""
        engine = self.engine
        if engine is not None:
            engine.wake(["weights"])
        dropped = broadcast_from_generator(self.rt.ctx, engine is not None and engine.needs_weights)
        metrics: dict[str, float] = {}
        if self.stale or dropped:
            metrics = stream_policy(self.rt, engine)
        if engine is not None:
            engine.wake(["kv_cache"])
        if metrics and self.rt.cfg.rollout.verify_weights == "logprobs":
            metrics["weight_sync/probe_max_diff"] = probe_logprobs(self.rt, engine, self.probe)
        self.stale = False
        return metrics

    def release(self) -> None:
        if self.engine is not None:
            self.engine.sleep()


def stream_policy(rt: Runtime, rollout: RolloutEngine | None) -> dict[str, float]:
    """Stream the policy into the rollout engine (checksums checked when configured); returns
    the stream's metrics. Collective: every rank walks the export.

    Raises:
        WeightSyncError: the engine does not hold the trainer's weights.
    """
    cfg = rt.cfg.rollout
    stream = export_hf_weights(rt.engine.module, rt.ctx, rt.engine.arch)
    report = None
    error = None
    if rollout is not None:
        verify = "checksum" if cfg.verify_weights == "checksum" else "none"
        try:
            report = stream_weights(stream, rollout, verify=verify)
        except WeightSyncError as err:
            error = str(err)
    for _ in stream:  # ranks without an engine (and an engine that failed) finish the collective
        pass
    error = broadcast_from_generator(rt.ctx, error)
    if error is not None:
        raise WeightSyncError(error)
    return report.as_metrics() if report is not None else {"weight_sync/tensors": 0.0}


def probe_logprobs(rt: Runtime, rollout: RolloutEngine | None, probe: Sample) -> float:
    """Compare the engine's and the trainer's log-probs of a fixed text sequence (on the
    generator's engine; the other engines of a vLLM group score it too, in step)."""
    mine = trainer_logprobs(rt, [probe], 1.0)[0]
    error, worst = None, 0.0
    if rollout is not None:
        theirs = rollout.score([probe.token_ids_L.tolist()], temperature=1.0)[0]
        if rt.is_generator:
            try:
                worst = check_logprobs(mine, theirs, atol=rt.cfg.rollout.verify_logprobs_atol)
            except WeightSyncError as err:
                error = str(err)
    error, worst = broadcast_from_generator(rt.ctx, (error, worst))
    if error is not None:
        raise WeightSyncError(error)
    return worst


def probe_sample(rt: Runtime) -> Sample:
    """A fixed text-only sequence (system + question + a canned answer) for the logprob probe."""
    text = rt.tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "Compute 3 + 4."},
            {"role": "assistant", "content": "<think> 3 + 4 = 7. </think><answer> $7$ </answer>"},
        ],
        tokenize=False,
    )
    ids = torch.tensor(rt.tokenizer(text, add_special_tokens=False)["input_ids"])
    return Sample(token_ids_L=ids, target_mask_L=torch.ones_like(ids, dtype=torch.bool))


def evaluate(
    rt: Runtime,
    client: RolloutClient,
    scorer: RewardScorer | None,
    problems: Sequence[Problem],
) -> dict[str, float]:
    """Greedy held-out accuracy and format rate (problems split over the DP replicas), scored
    as ``metis eval`` scores them."""
    cfg = rt.cfg
    mine = list(problems)[rt.ctx.dp_rank :: rt.ctx.dp]
    sums = {"n": 0.0, "accuracy": 0.0, "format": 0.0, "length": 0.0}
    greedy = EvalConfig(mode="greedy", max_new_tokens=cfg.train.eval_max_new_tokens)
    params = sampling_params(cfg.rollout, greedy)
    if client.engine is not None and mine and not rt.is_generator:
        client.generate(mine, params)  # a vLLM engine's other ranks generate in step
    if client.engine is not None and scorer is not None and mine and rt.is_generator:
        groups = client.sample_and_score(mine, params, scorer)
        samples = [s for group in groups for s in group]
        sums = {
            "n": float(len(mine)),
            "accuracy": float(sum(s.correct for s in samples)),
            "format": float(sum(s.format for s in samples)),
            "length": float(sum(s.num_tokens for s in samples)),
        }
    sums = broadcast_from_generator(rt.ctx, sums)
    sums = sum_over_dp(rt.ctx, sums)
    n = max(sums["n"], 1.0)
    return {
        "eval/accuracy": sums["accuracy"] / n,
        "eval/format": sums["format"] / n,
        "eval/response_length": sums["length"] / n,
        "eval/num_problems": sums["n"],
    }
