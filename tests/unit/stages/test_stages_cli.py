"""Config sections, and `metis triage / expert / eval` end to end on a tiny random Qwen2 HF
folder (text-only synthetic tasks)."""

from __future__ import annotations

import json

import pytest

from megatron_metis.cli.main import main
from megatron_metis.config import ConfigError, load_config
from megatron_metis.data.io import read_jsonl
from megatron_metis.data.synth import write_synthetic_dataset
from megatron_metis.models.tiny import (
    TinyTextSizes,
    init_tiny_model,
    save_tiny_model,
    tiny_qwen2_config,
)


def test_stage_sections_load_and_validate():
    cfg = load_config(
        None,
        [
            "triage.keep=shortest",
            "triage.k=2",
            "eval.mode=sampled",
            "eval.pass_k=[1,4]",
            "pipeline.expert_fraction=0.3",
        ],
    )
    assert cfg.triage.keep == "shortest" and cfg.triage.num_samples == 8
    assert cfg.eval.pass_k == [1, 4] and cfg.pipeline.rounds == 1
    assert cfg.expert.source == "solver" and cfg.expert.api_key_env == "OPENAI_API_KEY"
    for bad, key in [
        (["triage.keep=longest"], "triage.keep"),
        (["eval.pass_k=[16]"], "eval.pass_k"),
        (["expert.source=openai"], "expert.base_url"),
        (["expert.source=file"], "expert.file"),
        (["expert.source=local", "expert.local_hf_dir=m", "expert.num_samples=2"], "temperature"),
        (["pipeline.expert_fraction=1.5"], "pipeline.expert_fraction"),
        (["eval.mode=sampled", "eval.temperature=0"], "eval.mode"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, bad)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_tokenizer):
    sizes = TinyTextSizes(hidden_size=32, num_layers=1, max_position_embeddings=1024)
    config = tiny_qwen2_config(vocab_size=len(tiny_tokenizer), sizes=sizes)
    out = tmp_path_factory.mktemp("tiny_qwen2")
    return save_tiny_model(init_tiny_model(config, seed=0), out, tiny_tokenizer)


def test_cli_triage_expert_eval(tmp_path, hf_dir, capsys):
    write_synthetic_dataset(
        tmp_path / "data", n=10, seed=1, test_frac=0.3, categories=["arith", "algebra"]
    )
    common = [
        f"run.output_dir={tmp_path / 'run'}",
        f"data.train_files=[{tmp_path / 'data' / 'train.jsonl'}]",
        "rewards.num_workers=0",
        "rollout.max_new_tokens=6",
        "rollout.dtype=float32",
        "triage.num_samples=2",
    ]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run:\n  name: t\n")
    assert main(["triage", str(recipe), "--ckpt", str(hf_dir), *common]) == 0
    report = json.loads((tmp_path / "run" / "triage" / "report.json").read_text())
    n_train = len(read_jsonl(tmp_path / "data" / "train.jsonl"))
    assert sum(report["buckets"].values()) == report["num_prompts"] == n_train
    assert "done:" in capsys.readouterr().out
    # a second run is skipped
    assert main(["triage", str(recipe), "--ckpt", str(hf_dir), *common]) == 0
    assert "skipped" in capsys.readouterr().out

    assert main(["expert", str(recipe), *common]) == 0
    expert = json.loads((tmp_path / "run" / "expert" / "report.json").read_text())
    assert expert["num_prompts"] == report["buckets"]["expert"]
    assert expert["accepted"] == expert["num_prompts"]  # the programmatic solver is right

    test_file = tmp_path / "data" / "test.jsonl"
    assert (
        main(
            [
                "eval",
                str(recipe),
                "--ckpt",
                str(hf_dir),
                "--data",
                str(test_file),
                "--label",
                "base",
                *common,
            ]
        )
        == 0
    )
    ev = json.loads((tmp_path / "run" / "eval" / "base" / "eval.json").read_text())
    assert ev["label"] == "base" and ev["datasets"]["test"]["num_problems"] == len(
        read_jsonl(test_file)
    )
