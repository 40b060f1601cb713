"""Helpers of the end-to-end trainer tests: tiny assets, fake and misbehaving reward scorers,
and the per-rank bodies that ``spawn`` runs (module level, so they pickle)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from megatron_metis.config import RewardConfig, load_config
from megatron_metis.rewards import RewardScorer, ScoreBatch
from megatron_metis.rewards.verifier import GoldCache, Verdict

TIMEOUT_ANSWER = "<think> x </think><answer> $\\boxed{\\sqrt{49}}$ </answer>"


def base_overrides(hf_dir: str, data: str, out: str) -> list[str]:
    return [
        f"model.hf_dir={hf_dir}",
        "model.dtype=float32",
        f"data.train_files=[{data}/train.jsonl]",
        "data.system_prompt=Solve.",
        "data.image_min_pixels=3136",
        "data.image_max_pixels=12544",
        f"run.output_dir={out}",
        "rollout.dtype=float32",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "checkpoint.export_hf=false",
        "rewards.num_workers=0",
    ]


class DigitScorer:
    """A trivially learnable reward: the fraction of digit characters in the response (its
    "accuracy": whether it has a digit at all)."""

    def score(self, responses, golds, *, choices=None) -> ScoreBatch:
        rewards = [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]
        accuracy = [float(r > 0) for r in rewards]
        return ScoreBatch(rewards, accuracy, [0.0] * len(rewards), {})


def hang(answer: str, gold: str, *, timeout_s: float, cache: GoldCache) -> Verdict:
    """A verifier that never answers (alarms off): only the scorer's watchdog stops it."""
    signal.alarm(0)
    time.sleep(60)
    return Verdict.WRONG


class TimeoutScorer:
    """Real pool scorer whose verifier hangs on the first response of each batch, and whose
    rewards are all equal (so every group is filtered)."""

    def __init__(self) -> None:
        cfg = RewardConfig(num_workers=1, timeout_s=0.3, kill_grace_s=0.2, start_method="spawn")
        self.inner = RewardScorer(cfg, verify_fn=hang)

    def score(self, responses, golds, *, choices=None) -> ScoreBatch:
        responses = [TIMEOUT_ANSWER, *responses[1:]]
        out = self.inner.score(responses, ["7"] * len(responses))
        zeros = [0.0] * len(responses)
        return ScoreBatch(zeros, zeros, zeros, out.metrics)

    def close(self) -> None:
        self.inner.close()


def rl_worker(hf_dir: str, data: str, out: str, scorer_name: str, extra: list[str]) -> dict:
    """Run ``metis rl`` in this process with a test scorer; return the metrics by step."""
    from megatron_metis.trainer.metrics import read_metrics
    from megatron_metis.trainer.rl import run_rl

    torch.set_num_threads(1)
    cfg = load_config(None, base_overrides(hf_dir, data, out) + list(extra))
    scorer = DigitScorer() if scorer_name == "digits" else TimeoutScorer()
    try:
        run_rl(cfg, scorer=scorer)
    finally:
        if hasattr(scorer, "close"):
            scorer.close()
    return read_metrics(out, "rl")


def probe_worker(hf_dir: str, data: str, out: str, extra: list[str]) -> list[dict]:
    """``trainer.update_probe.probe_updates`` in this process, with the digit reward."""
    from megatron_metis.trainer.update_probe import probe_updates

    torch.set_num_threads(1)
    cfg = load_config(None, base_overrides(hf_dir, data, out) + list(extra))
    return probe_updates(cfg, updates=3, scorer=DigitScorer())


RECIPES = Path(__file__).resolve().parents[2] / "examples" / "recipes"


def tiny_recipe_worker(root: str, seed: int, warmup_steps: int, rl_steps: int) -> dict:
    """The tiny recipes, short, on counting and bar comparison (difficulty 1): warm-up SFT
    from a random tiny Qwen2.5-VL, ``metis rl``, and held-out accuracy (sampled at T=1, 4 per
    problem) of both; returns the accuracies and the RL metrics by step."""
    from megatron_metis.data.synth import write_synthetic_dataset
    from megatron_metis.stages.steps import eval_step
    from megatron_metis.trainer.metrics import read_metrics
    from megatron_metis.trainer.rl import run_rl
    from megatron_metis.trainer.sft import run_sft

    torch.set_num_threads(2)
    data = Path(root) / "data"
    write_synthetic_dataset(data, n=600, seed=11, categories=["compare", "count"], difficulties=[1])
    common = [
        f"run.seed={seed}",
        f"data.train_files=[{data}/train.jsonl]",
        "data.test_files=[]",
        "train.eval_interval=0",
        "checkpoint.save_interval=0",
        "logging.progress_bar=false",
        "rewards.num_workers=0",
    ]
    warm = load_config(
        str(RECIPES / "sft-tiny-qwen2.5vl-cpu.yaml"),
        [
            *common,
            f"model.hf_dir={root}/init",
            f"run.output_dir={root}/warmup",
            f"train.max_steps={warmup_steps}",
        ],
    )
    run_sft(warm)
    rl = load_config(
        str(RECIPES / "grpo-tiny-qwen2.5vl-cpu.yaml"),
        [
            *common,
            f"model.hf_dir={root}/warmup/hf",
            f"run.output_dir={root}/rl",
            f"train.max_steps={rl_steps}",
            "eval.mode=sampled",
            "eval.temperature=1.0",
            "eval.num_samples=4",
        ],
    )
    run_rl(rl)
    test = [data / "test.jsonl"]
    acc = {
        label: eval_step(rl, Path(root) / label / "hf", test, Path(root) / f"eval_{label}")[
            "average"
        ]
        for label in ("warmup", "rl")
    }
    return {"base": acc["warmup"], "rl": acc["rl"], "rl_metrics": read_metrics(f"{root}/rl", "rl")}
