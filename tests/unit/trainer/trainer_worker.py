"""Per-rank bodies of the trainer tests (module level, so ``spawn`` can pickle them)."""

from __future__ import annotations

import torch

from megatron_metis.algorithms import sft_loss
from megatron_metis.config import load_config
from megatron_metis.parallel import from_last_stage, global_count, sum_over_dp
from megatron_metis.trainer.batching import Sample, build_microbatches, pack_rows
from megatron_metis.trainer.rollout_io import (
    RolloutSession,
    build_client,
    build_rollout,
    probe_sample,
    trainer_logprobs,
)
from megatron_metis.trainer.setup import build_runtime
from megatron_metis.trainer.sft import sft_step
from megatron_metis.trainer.sft_data import load_sft_dataset


def overrides(hf_dir: str, data: str, out: str, *extra: str) -> list[str]:
    return [
        f"model.hf_dir={hf_dir}",
        "model.dtype=float32",
        "model.make_vocab_size_divisible_by=128",
        f"data.train_files=[{data}/train.jsonl]",
        "data.system_prompt=Solve.",
        "data.image_min_pixels=3136",
        "data.image_max_pixels=12544",
        "sft.response_field=expert",
        f"run.output_dir={out}",
        "optimizer.lr=1e-3",
        "optimizer.clip_grad=0.5",
        "rollout.dtype=float32",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        *extra,
    ]


def _loss_of(rt, samples: list[Sample], *, pack: bool) -> float:
    """Forward-only SFT loss of the samples (global token mean) at this layout."""
    engine = rt.engine
    rows = pack_rows(samples, max_tokens=2048, pack=pack)
    mbs = build_microbatches(
        rows,
        micro_batch_size=1,
        pad_id=0,
        position_fn=engine.position_fn,
        pad_to_multiple=engine.row_multiple,
    )
    ntok = global_count(rt.ctx, sum(s.num_targets for s in samples))

    def fn(logits, inputs):
        lp, _ = engine.logprobs(logits, inputs["labels"])
        return float(sft_loss(lp, inputs["loss_mask"], num_global_tokens=ntok)[0])

    outs = engine.forward_only(mbs, fn)
    local = from_last_stage(rt.ctx, {"loss": sum(outs)} if rt.ctx.is_last_stage else None)
    return sum_over_dp(rt.ctx, local, with_cp=True)["loss"]


def layout_worker(
    hf_dir: str, data: str, out: str, tp: int, pp: int, steps: int, cp: int = 1
) -> dict:
    """At one layout: per-sample log-probs, packed/unpacked SFT loss, then ``steps`` SFT steps
    on a fixed batch (split over DP) with their losses and grad norms."""
    torch.set_num_threads(1)
    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.cp={cp}"]
    cfg = load_config(None, overrides(hf_dir, data, out, *layout))
    rt, _ = build_runtime(cfg, phase="sft", total_steps=steps)
    ds = load_sft_dataset(
        cfg.data.train_files, cfg.data, cfg.sft, processor=rt.processor, chat=rt.chat
    )
    samples = ds.samples(range(6))
    result: dict = {
        "logprobs": [lp.clone() for lp in trainer_logprobs(rt, samples, 1.0)],
        "loss_unpacked": _loss_of(rt, samples, pack=False),
        "loss_packed": _loss_of(rt, samples, pack=True),
        "step_loss": [],
        "grad_norm": [],
    }
    mine = ds.samples(range(rt.ctx.dp_rank, 6, rt.ctx.dp))
    for step in range(steps):
        metrics = sft_step(rt, mine, step)
        result["step_loss"].append(metrics["loss"])
        result["grad_norm"].append(metrics["grad_norm"])
    result["after_logprobs"] = [lp.clone() for lp in trainer_logprobs(rt, samples[:2], 1.0)]
    rt.ctx.destroy()
    return result


class CorruptingEngine:
    """Wraps a rollout engine and perturbs one tensor of the stream on its way in."""

    def __init__(self, inner, name_part: str) -> None:
        self.inner, self.name_part = inner, name_part
        self.weight_dtype = inner.weight_dtype

    def load_weights(self, named_tensors):
        def corrupted():
            for name, tensor in named_tensors:
                if self.name_part in name:
                    tensor = tensor.clone()
                    tensor.view(-1)[0] += 0.5
                yield name, tensor

        self.inner.load_weights(corrupted())

    def __getattr__(self, name):
        return getattr(self.inner, name)


VLLM_CPU_OVERRIDES = (
    "rollout.vllm_overrides={enforce_eager: true, kv_cache_memory_bytes: 268435456, "
    "max_model_len: 1024}"
)
"""vLLM on the CPU in tests: eager, a 256 MiB KV cache, prompts of the tiny tasks fit 1024."""


def _backend_overrides(backend: str, verify: str) -> list[str]:
    if backend == "hf":
        return [f"rollout.verify_weights={verify}"]
    return ["rollout.backend=vllm", "rollout.verify_weights=logprobs", VLLM_CPU_OVERRIDES]


def sync_worker(hf_dir: str, data: str, out: str, tp: int, backend: str = "hf") -> dict:
    """Train 2 steps, stream the weights into a ``backend`` engine, compare the engine's and the
    trainer's log-probs (scored text; with vLLM also sampled responses to image and text
    prompts); then stream through a corrupting engine under each check the backend has."""
    from megatron_metis.data import load_problems
    from megatron_metis.rollout import WeightSyncError

    torch.set_num_threads(1)
    base = [f"parallel.tp={tp}", "rollout.max_new_tokens=12"]
    cfg = load_config(
        None, overrides(hf_dir, data, out, *base, *_backend_overrides(backend, "checksum"))
    )
    rt, _ = build_runtime(cfg, phase="sft", total_steps=2)
    ds = load_sft_dataset(
        cfg.data.train_files, cfg.data, cfg.sft, processor=rt.processor, chat=rt.chat
    )
    for step in range(2):
        sft_step(rt, ds.samples(range(4)), step)
    rollout = build_rollout(rt)
    probe = probe_sample(rt)
    result: dict = {"sync": RolloutSession(rt, rollout, probe).ready()}
    samples = ds.samples(range(3))
    mine = trainer_logprobs(rt, samples, 1.0)
    probe_mine = trainer_logprobs(rt, [probe], 1.0)[0]  # collective: every rank
    if rollout is not None:
        theirs = rollout.score([s.token_ids_L.tolist() for s in samples])
        probe_theirs = rollout.score([probe.token_ids_L.tolist()])[0]
        result["probe_diff"] = float((probe_mine - probe_theirs).abs().max())
        # score() takes text only: compare the text samples (image ones need their pixels)
        result["text_diffs"] = [
            float((a - b).abs().max())
            for a, b, s in zip(mine, theirs, samples, strict=True)
            if s.pixel_values_PC is None
        ]
    if backend == "vllm":
        problems = load_problems(list(cfg.data.train_files), cfg.data, rt.tokenizer).problems[:6]
        result["gaps"] = _sampled_logprob_gaps(rt, build_client(rt, rollout), problems)
    errors = {}
    for mode in ("checksum", "logprobs") if backend == "hf" else ("logprobs",):
        bad = CorruptingEngine(rollout, "layers.1.mlp.down_proj") if rollout is not None else None
        rt.cfg = load_config(
            None, overrides(hf_dir, data, out, *base, *_backend_overrides(backend, mode))
        )
        try:
            RolloutSession(rt, bad, probe).ready()
            errors[mode] = None
        except WeightSyncError as err:
            errors[mode] = str(err)
    result["errors"] = errors
    rt.ctx.destroy()
    return result


def _sampled_logprob_gaps(rt, client, problems) -> dict[str, float]:
    """Max |trainer - engine| log-prob of sampled response tokens (the RL step's
    ``rollout_logprob_gap``), over the image prompts and over the text prompts."""
    from megatron_metis.rollout.client import sampling_params

    params = sampling_params(rt.cfg.rollout, n=2, seed=1)
    completions = client.generate(problems, params)  # every rank: one vLLM engine per rank
    samples = []
    for c in completions:
        req = client.request(problems[c.request_index])
        ids = torch.tensor(list(req.prompt_ids) + c.token_ids)
        mm = req.mm_inputs or {}
        samples.append(
            Sample(
                token_ids_L=ids,
                target_mask_L=torch.ones_like(ids, dtype=torch.bool),
                pixel_values_PC=mm.get("pixel_values"),
                image_grid_thw_N3=mm.get("image_grid_thw"),
            )
        )
    trainer = trainer_logprobs(rt, samples, rt.cfg.rollout.temperature)
    gaps = {"image": 0.0, "text": 0.0, "image_tokens": 0, "text_tokens": 0}
    for c, lp, s in zip(completions, trainer, samples, strict=True):
        kind = "image" if s.pixel_values_PC is not None else "text"
        n = len(c.token_ids)
        gap = (lp[-n:] - torch.tensor(c.logprobs)).abs().max()
        gaps[kind] = max(gaps[kind], float(gap))
        gaps[f"{kind}_tokens"] += n
    return gaps


class RecordingEngine:
    """An HF rollout engine that records the session's calls; ``drops_weights`` makes ``sleep``
    discard the weights as vLLM's level-2 sleep does."""

    def __init__(self, inner, *, drops_weights: bool) -> None:
        self.inner, self.drops_weights = inner, drops_weights
        self.weight_dtype = inner.weight_dtype
        self.needs_weights = False
        self.calls: list[str] = []
        self.awake = {"weights", "kv_cache"}

    def wake(self, tags=None):
        tags = list(tags) if tags is not None else ["weights", "kv_cache"]
        self.calls.append("wake:" + "+".join(tags))
        self.awake |= set(tags)

    def sleep(self):
        self.calls.append("sleep")
        self.awake = set()
        self.needs_weights = self.drops_weights

    def load_weights(self, named_tensors):
        assert "weights" in self.awake and "kv_cache" not in self.awake, self.awake
        self.calls.append("load_weights")
        self.inner.load_weights(named_tensors)
        self.needs_weights = False

    def score(self, sequences, *, temperature=1.0):
        self.calls.append("score")
        return self.inner.score(sequences, temperature=temperature)

    def generate(self, requests, params):
        assert self.awake == {"weights", "kv_cache"} and not self.needs_weights
        self.calls.append("generate")
        return self.inner.generate(requests, params)

    def checksum(self, names):
        return self.inner.checksum(names)


def session_worker(hf_dir: str, data: str, out: str, drops_weights: bool) -> list[list[str]]:
    """The calls a RolloutSession makes over: a first generation, one after an unchanged
    policy, one after an update; each ``ready -> generate -> release``."""
    from megatron_metis.data import load_problems
    from megatron_metis.rollout.client import sampling_params
    from megatron_metis.rollout.hf_engine import HFRolloutEngine

    torch.set_num_threads(1)
    cfg = load_config(None, overrides(hf_dir, data, out, "rollout.verify_weights=logprobs"))
    rt, _ = build_runtime(cfg, phase="sft", total_steps=1)
    inner = HFRolloutEngine.from_pretrained(rt.hf_dir, cfg.rollout)
    engine = RecordingEngine(inner, drops_weights=drops_weights)
    session = RolloutSession(rt, engine, probe_sample(rt))
    client = build_client(rt, engine)
    problems = load_problems(list(cfg.data.train_files), cfg.data, rt.tokenizer).problems[:1]
    params = sampling_params(cfg.rollout, n=1, seed=0)
    steps = []
    for policy_changed in (False, False, True):
        if policy_changed:
            session.policy_changed()
        engine.calls.clear()
        session.ready()
        client.generate(problems, params)
        session.release()
        steps.append(list(engine.calls))
    rt.ctx.destroy()
    return steps


class CountingEngine:
    """A rollout engine on every rank (as vLLM's are): counts the ``generate`` calls."""

    def __init__(self, inner) -> None:
        self.inner, self.generate_calls = inner, 0

    def generate(self, requests, params):
        self.generate_calls += 1
        return self.inner.generate(requests, params)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class RoundScorer:
    """Round 1: every response right (all groups filtered); later rounds: alternating verdicts
    (every group kept). Counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, responses, golds, *, choices=None):
        from megatron_metis.rewards.scorer import ScoreBatch

        self.calls += 1
        acc = (
            [1.0] * len(responses)
            if self.calls == 1
            else [float(i % 2) for i in range(len(responses))]
        )
        return ScoreBatch(rewards=acc, accuracy=acc, format=[1.0] * len(acc), metrics={})


class FailingScorer:
    """What a rank's verifier looks like when it times out: any call fails."""

    def score(self, responses, golds, *, choices=None):
        raise TimeoutError("this rank's verifier timed out")


def collect_worker(hf_dir: str, data: str, out: str) -> dict:
    """Dynamic sampling at TP=2 with an engine on both ranks (vLLM's layout) and a verifier that
    would fail on rank 1: the generator scores, both ranks take its decisions."""
    from megatron_metis.data import load_problems
    from megatron_metis.rollout.hf_engine import HFRolloutEngine
    from megatron_metis.trainer import rl_steps
    from megatron_metis.trainer.state import DataCursor

    torch.set_num_threads(1)
    grpo = ["grpo.group_size=2", "grpo.num_prompts_per_step=2", "grpo.max_sampling_rounds=3"]
    extra = ["parallel.tp=2", "grpo.filter_on=accuracy", "rollout.max_new_tokens=8", *grpo]
    cfg = load_config(None, overrides(hf_dir, data, out, *extra))
    rt, _ = build_runtime(cfg, phase="rl", total_steps=1)
    engine = CountingEngine(HFRolloutEngine.from_pretrained(rt.hf_dir, cfg.rollout))
    client = build_client(rt, engine)
    scorer = RoundScorer() if rt.is_generator else FailingScorer()
    problems = load_problems(list(cfg.data.train_files), cfg.data, rt.tokenizer).problems[:8]
    cursor = DataCursor(num_items=len(problems), seed=0)
    batch = rl_steps.collect_rollouts(rt, client, scorer, problems, cursor, step=0)
    result = {
        "generate_calls": engine.generate_calls,
        "groups": [g.problem.id for g in batch.groups],
        "rounds": batch.sums["groups_rounds"],
        "cursor": (batch.cursor.epoch, batch.cursor.index),
    }
    rt.ctx.destroy()
    return result
