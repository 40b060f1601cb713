"""Between the trainer and the rollout engine: its client, weight streaming and its checks, eval.

The rollout engine lives on the generator rank of each data-parallel replica (TP rank 0,
stage 0; ``Runtime.is_generator``). Weight streaming is collective: every rank walks the
``export_hf_weights`` stream (the TP/PP shards are gathered into full HF tensors one at a time),
and the generator hands it, in buckets of at most ``rollout.weight_bucket_mb``, to its engine.

Checks after each stream (``rollout.verify_weights``): ``checksum`` compares per-tensor
checksums bucket by bucket; ``logprobs`` compares the engine's log-probs of a probe sequence
with the trainer's. A mismatch raises ``WeightSyncError`` and stops the run.
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
    rank (its tensor-parallel groups must be the trainer's TP groups: ranks with the same
    data-parallel replica generate the same batch, and the generator's copy is kept).
    """
    if rt.cfg.rollout.backend != "hf":
        # vLLM is SPMD: every rank creates its share of a colocated engine (external launcher)
        return build_rollout_engine(rt.cfg.rollout, rt.hf_dir, device=rt.ctx.device)
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


def sync_weights(rt: Runtime, rollout: RolloutEngine | None, probe: Sample) -> dict[str, float]:
    """Stream the policy into the rollout engine and check it; returns the sync metrics.

    Raises:
        WeightSyncError: the engine does not hold the trainer's weights.
    """
    cfg = rt.cfg.rollout
    stream = export_hf_weights(rt.engine.module, rt.ctx, rt.engine.arch)
    report = None
    error = None
    if rollout is not None:
        rollout.wake()
        verify = "checksum" if cfg.verify_weights == "checksum" else "none"
        try:
            report = stream_weights(
                stream, rollout, bucket_bytes=cfg.weight_bucket_mb * 2**20, verify=verify
            )
        except WeightSyncError as err:
            error = str(err)
    for _ in stream:  # other ranks (and a generator that stopped early) finish the collective
        pass
    error = broadcast_from_generator(rt.ctx, error)
    if error is not None:
        raise WeightSyncError(error)
    metrics = report.as_metrics() if report is not None else {}
    if cfg.verify_weights == "logprobs":
        metrics["weight_sync/probe_max_diff"] = probe_logprobs(rt, rollout, probe)
    return metrics


def probe_logprobs(rt: Runtime, rollout: RolloutEngine | None, probe: Sample) -> float:
    """Compare the engine's and the trainer's log-probs of a fixed text sequence."""
    mine = trainer_logprobs(rt, [probe], 1.0)[0]
    error, worst = None, 0.0
    if rollout is not None:
        theirs = rollout.score([probe.token_ids_L.tolist()], temperature=1.0)[0]
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
    if client.engine is not None and scorer is not None and mine:
        greedy = EvalConfig(mode="greedy", max_new_tokens=cfg.train.eval_max_new_tokens)
        groups = client.sample_and_score(mine, sampling_params(cfg.rollout, greedy), scorer)
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
