"""``train.logprob_impl=fused`` against the logits path: GRPO loss, metrics and gradients.

Each spawned job builds, per model, two engines from the same weights, one per
``train.logprob_impl``, and runs on both the same packed micro-batches (several responses per
row, a padding row, two micro-batches per step) through the trainer's own code:
``attach_logprobs`` (forward-only old log-probs), then ``engine.train_step`` with
``grpo_loss_fn`` (clipped loss at temperature 0.7, KL to reference log-probs), and a
forward-only SFT loss. Compared: the old log-probs, every loss metric, the grad norm, every
parameter's gradient (``main_grad``, this rank's shard), the parameters after the step (SGD)
and the state-dict names (the hidden-state model keeps them).
Models: a tiny Qwen2 with tied embeddings and a vocabulary of 131 (padded to 256, so the second
TP rank's shard is mostly padding) and a tiny Qwen2.5-VL (untied, M-RoPE). Layouts: TP=1,
TP=2, PP=2 (tied embeddings across stages: Megatron's embedding-gradient all-reduce).
Measured (fp32): every relative difference <= 6e-7 (the tolerance is 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_qwen2

from megatron_metis.parallel import spawn

IMPLS = ("logits", "fused")
NOISE = ("old", "ref")
LOSS_KEYS = ("tokens", "clip_frac", "entropy", "pg_loss", "kl")
REL_TOL = 1e-5
"""fp32: the two paths differ only in summation order (chunked log-sum-exp, GEMM shapes)."""


def _config(hf_dir: str, out: str, impl: str, tp: int, pp: int, loss_agg: str):
    from megatron_metis.config import load_config

    return load_config(
        None,
        [
            f"model.hf_dir={hf_dir}",
            "model.dtype=float32",
            "model.make_vocab_size_divisible_by=128",
            f"run.output_dir={out}",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"train.logprob_impl={impl}",
            "train.logprob_chunk_tokens=16",
            "train.max_tokens_per_row=32",
            "rollout.temperature=0.7",
            f"grpo.loss_agg={loss_agg}",
            "grpo.kl_coef=0.05",
            "optimizer.name=sgd",  # Adam's first step is ~sign(grad): it amplifies 1e-12 grads
            "optimizer.lr=1e-1",
            "optimizer.clip_grad=1e9",
        ],
    )


def _token_bound(hf_dir: str, vocab: int) -> int:
    """Random tokens stay below the vision special tokens (no image placeholders)."""
    from megatron_metis.models import read_hf_config

    hf = read_hf_config(hf_dir)
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return min([vocab] + [int(hf[k]) for k in keys if hf.get(k) is not None])


def _samples(vocab: int, seed: int) -> list:
    """Six prompt + response sequences of 9..16 tokens (ids < ``vocab``), +-advantages."""
    from megatron_metis.trainer.batching import Sample

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(6):
        n_prompt, n_resp = 3 + i % 3, 6 + (5 * i) % 10
        ids = torch.randint(0, vocab, (n_prompt + n_resp,), generator=gen)
        mask = torch.cat([torch.zeros(n_prompt, dtype=torch.bool), torch.ones(n_resp).bool()])
        adv = float(torch.randn((), generator=gen))
        values = {"advantage": torch.full((len(ids),), adv)}
        out.append(Sample(token_ids_L=ids, target_mask_L=mask, values=values, index=i))
    return out


def _engine(cfg, ctx):
    from megatron_metis.trainer.engine import TrainEngine
    from megatron_metis.trainer.setup import build_policy_model

    module, arch = build_policy_model(cfg, ctx, cfg.model.hf_dir)
    return TrainEngine(module, arch, ctx, cfg, total_steps=1)


def _refuses_other_output(engine, cfg) -> bool:
    """``TrainEngine`` refuses ``engine``'s model under the other ``train.logprob_impl``."""
    import dataclasses

    from megatron_metis.trainer.engine import TrainEngine

    other = "logits" if cfg.train.logprob_impl == "fused" else "fused"
    other_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, logprob_impl=other))
    try:
        TrainEngine(engine.module, engine.arch, engine.ctx, other_cfg, total_steps=1)
    except ValueError as err:
        return "returns_hidden_states" in str(err)
    return False


def _microbatches(engine, samples) -> list:
    from megatron_metis.trainer.batching import build_microbatches, pack_rows

    rows = pack_rows(samples, max_tokens=engine.cfg.train.max_tokens_per_row, pack=True)
    assert len(rows) >= 3 and max(len(r) for r in rows) >= 2  # packed rows, a padding row
    return build_microbatches(rows, micro_batch_size=2, pad_id=0, position_fn=engine.position_fn)


def _run_engine(engine, samples, noise: dict[str, list], base_old: list | None) -> dict:
    """Old log-probs, one GRPO train step and a forward-only SFT loss on ``engine``.

    The loss's old and reference log-probs are ``base_old`` (the logits path's, so that the
    fused path's log-probs meet the logits path's inside the ratio and the KL) perturbed by
    ``noise``; ``base_old=None``: this engine's own.
    """
    from megatron_metis.algorithms import local_loss_normalisers, sft_loss
    from megatron_metis.trainer.rl_steps import attach_logprobs, grpo_loss_fn

    cfg = engine.cfg
    mbs = _microbatches(engine, samples)
    attach_logprobs(engine, engine.ddp, [mbs], "old_logprobs", 0.7)
    result: dict = {"old_logprobs": [dict(li).get("old_logprobs") for _, li in mbs]}
    base_old = result["old_logprobs"] if base_old is None else base_old
    for k, (_, inputs) in enumerate(mbs):
        if "old_logprobs" in inputs:  # last stage: the same inputs on both paths
            old = base_old[k]
            b, length = old.shape
            inputs["ref_logprobs"] = old - noise["ref"][k][:b, :length]
            inputs["old_logprobs"] = old + noise["old"][k][:b, :length]
    norms = {
        "tokens": float(sum(local_loss_normalisers(s.target_mask_L[1:])[0] for s in samples)),
        "seqs": float(len(samples)),
    }
    out = engine.train_step(mbs, grpo_loss_fn(engine, cfg, norms), 0)
    sums = {k: sum(m.get(k, 0.0) for m in out.microbatch_metrics) for k in LOSS_KEYS}
    result.update(metrics=sums, grad_norm=out.grad_norm)
    result["grads"] = {n: p.main_grad.clone() for n, p in engine.module.named_parameters()}
    result["params"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    result["state_keys"] = sorted(engine.module.state_dict())

    def sft(output, inputs):
        lp, _ = engine.logprobs(output, inputs["labels"])
        return float(sft_loss(lp, inputs["loss_mask"], num_global_tokens=norms["tokens"])[0])

    result["sft_loss"] = sum(engine.forward_only(_microbatches(engine, samples), sft))
    return result


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _compare(got: dict, ref: dict) -> dict[str, float]:
    """Largest relative differences of ``got`` (fused) from ``ref`` (logits)."""
    olds = [
        (a, b)
        for a, b in zip(got["old_logprobs"], ref["old_logprobs"], strict=True)
        if a is not None
    ]
    diffs = {
        "old_logprobs": max((float((a - b).abs().max()) for a, b in olds), default=0.0),
        "grad_norm": abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"],
        "grads": max(_rel(got["grads"][n], g) for n, g in ref["grads"].items()),
        "params": max(_rel(got["params"][n], p) for n, p in ref["params"].items()),
        "sft_loss": abs(got["sft_loss"] - ref["sft_loss"]) / max(abs(ref["sft_loss"]), 1e-12),
    }
    for k, v in ref["metrics"].items():
        diffs[f"metric:{k}"] = abs(got["metrics"][k] - v) / max(abs(v), 1e-12)
    return diffs


def parity_worker(hf_dirs: dict[str, str], out: str, tp: int, pp: int, loss_agg: str) -> dict:
    """Per model: both impls on the same batch at this layout; the differences and a few
    absolute values (so the test can check the step did something)."""
    from megatron_metis.models.output_head import decoder_of
    from megatron_metis.parallel import init_parallel

    torch.set_num_threads(1)
    ctx = None
    report: dict = {}
    for name, hf in hf_dirs.items():
        runs, heads, refused = {}, {}, {}
        for impl in IMPLS:
            cfg = _config(hf, out, impl, tp, pp, loss_agg)
            ctx = ctx or init_parallel(cfg.parallel, seed=cfg.run.seed)
            engine = _engine(cfg, ctx)
            heads[impl] = type(decoder_of(engine.module)).__name__
            refused[impl] = _refuses_other_output(engine, cfg)
            samples = _samples(_token_bound(hf, engine.arch.vocab_size), seed=1)
            gen = torch.Generator().manual_seed(2)
            noise = {k: [torch.randn(2, 48, generator=gen) * 0.3 for _ in range(4)] for k in NOISE}
            base = runs["logits"]["old_logprobs"] if runs else None
            runs[impl] = _run_engine(engine, samples, noise, base)
        report[name] = {
            "diffs": _compare(runs["fused"], runs["logits"]),
            "metrics": runs["logits"]["metrics"],
            "grad_norm": runs["logits"]["grad_norm"],
            "heads": heads,
            "output_layer": type(getattr(decoder_of(engine.module), "output_layer", None)).__name__,
            "refused": refused,
            "last_stage": ctx.is_last_stage,
            "same_state_keys": runs["fused"]["state_keys"] == runs["logits"]["state_keys"],
        }
    ctx.destroy()
    return report


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    from megatron_metis.models.tiny import build_tiny_qwen2_5_vl

    root: Path = tmp_path_factory.mktemp("fused_loss")
    make_tiny_qwen2(root / "qwen2_tied", tie_word_embeddings=True, num_layers=2)
    vl = build_tiny_qwen2_5_vl(root / "vl", hidden_size=64, num_layers=2)
    return {"qwen2_tied": str(root / "qwen2_tied"), "vl": str(vl)}


LAYOUTS = {
    "tp1": (1, 1, 1, "seq_mean", ("qwen2_tied", "vl")),
    "tp2": (2, 1, 2, "token_mean", ("qwen2_tied", "vl")),
    "pp2": (1, 2, 2, "token_mean", ("qwen2_tied",)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_grpo_step_equals_logits_path(hf_dirs, tmp_path, layout):
    tp, pp, world, loss_agg, models = LAYOUTS[layout]
    dirs = {m: hf_dirs[m] for m in models}
    reports = spawn(parity_worker, world, dirs, str(tmp_path), tp, pp, loss_agg, timeout_s=240)
    for rank, report in enumerate(reports):
        for model, r in report.items():
            print(layout, rank, model, {k: f"{v:.1e}" for k, v in r["diffs"].items()})
            assert r["grad_norm"] > 0 and r["same_state_keys"]
            assert r["heads"] == {"logits": "GPTModel", "fused": "HiddenStateGPTModel"}
            assert r["refused"] == {"logits": True, "fused": True}
            if r["last_stage"]:
                assert r["output_layer"] == "ColumnParallelLinear"  # weights and names kept
                assert r["metrics"]["kl"] > 0 and r["metrics"]["tokens"] > 0
                assert r["metrics"]["clip_frac"] > 0  # the noisy old log-probs clip some
            for key, diff in r["diffs"].items():
                assert diff < REL_TOL, (layout, rank, model, key, diff)
