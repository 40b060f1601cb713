"""Every recipe in examples/recipes loads and validates; the layouts fit the GPUs named in the
file name, and the model shapes split at the recipe's TP/PP."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from megatron_metis.config import load_config
from megatron_metis.models.arch import Qwen2Arch

ALL_RECIPES = sorted((Path(__file__).resolve().parents[3] / "examples" / "recipes").glob("*.yaml"))
RECIPES = [p for p in ALL_RECIPES if not p.name.startswith("pipeline-")]
PIPELINES = [p for p in ALL_RECIPES if p.name.startswith("pipeline-")]
# decoder shapes of the released checkpoints (config.json text part)
SHAPES = {
    "7b": {
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "num_hidden_layers": 28,
        "hidden_size": 3584,
        "intermediate_size": 18944,
    },
    "72b": {
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "num_hidden_layers": 80,
        "hidden_size": 8192,
        "intermediate_size": 29568,
    },
}


def test_there_are_cpu_and_gpu_recipes():
    names = {p.name for p in RECIPES}
    assert {"sft-tiny-qwen2.5vl-cpu.yaml", "grpo-tiny-qwen2.5vl-cpu.yaml"} <= names
    for size, layout in (("7b", "1n8g"), ("72b", "8n8g")):
        assert any(n.startswith(f"grpo-qwen2.5vl-{size}-{layout}") for n in names)
        assert any(n.startswith(f"sft-qwen2.5vl-{size}-{layout}") for n in names)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_fits_its_cluster(recipe):
    cfg = load_config(recipe)
    assert cfg.train.max_steps >= 1 or recipe.name.startswith("sft")
    match = re.search(r"-(\d+)n(\d+)g-", recipe.name)
    if match is None:
        assert cfg.parallel.device == "cpu"
        return
    gpus = int(match[1]) * int(match[2])
    model_parallel = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    assert gpus % model_parallel == 0
    dp = gpus // model_parallel
    if recipe.name.startswith("sft"):
        assert cfg.sft.global_batch_size % dp == 0
    size = re.search(r"qwen2\.5vl-(\d+b)", recipe.name)[1]
    shape = SHAPES[size]
    arch = Qwen2Arch.from_hf_dict({**shape, "vocab_size": 152064, "rms_norm_eps": 1e-6})
    arch.check_parallel(cfg.parallel.tp, cfg.parallel.pp)


def _phase_configs(cfg):
    """(phase recipe, its config with the pipeline's overrides) for each phase ``cfg`` names."""
    from megatron_metis.stages.pipeline import phase_config

    p = cfg.pipeline
    for name, overrides in (
        (p.warmup_recipe, p.warmup_overrides),
        (p.rl_recipe, p.rl_overrides),
        (p.sft_recipe, p.sft_overrides),
    ):
        if name:
            yield name, phase_config(name, overrides, **{"run.output_dir": "x"})


@pytest.mark.parametrize("recipe", PIPELINES, ids=lambda p: p.name)
def test_pipeline_recipe_and_its_phase_recipes_load(recipe, monkeypatch):
    """A pipeline recipe names its phase recipes; each loads with the pipeline's overrides."""
    monkeypatch.chdir(Path(__file__).resolve().parents[3])
    phases = list(_phase_configs(load_config(recipe)))
    assert phases
    for _, phase in phases:
        assert phase.train.max_steps >= 1


TINY = [p for p in ALL_RECIPES if "tiny" in p.name]


def _longest_synthetic_solution(tokenizer) -> int:
    """Tokens of the longest expert solution over every synthetic category and difficulty."""
    from megatron_metis.data.synth.build import generate_rows

    rows = generate_rows(400, seed=0, difficulties=(1, 2, 3))
    return max(len(tokenizer(row["expert"])["input_ids"]) for row, _ in rows)


def test_tiny_recipes_generate_long_enough_for_every_synthetic_solution(
    monkeypatch, tiny_tokenizer
):
    """A response cut at rollout.max_new_tokens has no answer and scores 0: with a limit below
    the longest solutions (64 < 71 tokens of a 9-shape count at difficulty 2), RL learned to
    write shorter, wrong counts and the evals could not score those problems at all."""
    monkeypatch.chdir(Path(__file__).resolve().parents[3])
    longest = _longest_synthetic_solution(tiny_tokenizer)
    assert longest >= 60  # the count solutions list every shape: the bound is a real one
    for recipe in TINY:
        cfg = load_config(recipe)
        limits = {recipe.name: cfg.rollout.max_new_tokens}
        for name, phase in _phase_configs(cfg):
            limits[f"{recipe.name} -> {name}"] = phase.rollout.max_new_tokens
        for where, limit in limits.items():
            assert limit > longest, f"{where}: rollout.max_new_tokens={limit} <= {longest}"


def test_packing_under_transformer_engine_is_refused(monkeypatch):
    """TE's causal attention ignores the block mask of packed rows: the trainer refuses the
    combination (naming the key) instead of training samples that attend to each other; the
    GPU recipes turn packing off."""
    from megatron_metis.config import ConfigError
    from megatron_metis.trainer import setup

    monkeypatch.setattr(setup, "use_transformer_engine", lambda *_: True)
    cuda = torch.device("cuda")
    with pytest.raises(ConfigError, match="train.pack_sequences=true with Transformer Engine"):
        setup.check_packing_supported(load_config(None, []), cuda)
    gpu_recipes = [p for p in RECIPES if "tiny" not in p.name]
    assert len(gpu_recipes) == 4
    for path in gpu_recipes:
        setup.check_packing_supported(load_config(str(path), []), cuda)
