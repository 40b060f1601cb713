"""The conversion tools end to end, as a user runs them: HF -> Megatron (TP=2) -> HF (PP=2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_qwen2
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[3]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "tool", ["tools/convert_hf_to_megatron.py", "tools/convert_megatron_to_hf.py"]
)
def test_tools_have_help(tool):
    result = _run(tool, "--help")
    assert result.returncode == 0
    assert "--out-dir" in result.stdout and "--tp" in result.stdout


def test_metis_help_lists_subcommands():
    result = _run("-m", "megatron_metis.cli.main", "--help")
    assert result.returncode == 0
    assert "convert" in result.stdout and "data" in result.stdout


def test_round_trip_through_the_tools(tmp_path):
    original = make_tiny_qwen2(tmp_path / "hf", tie_word_embeddings=True, num_layers=2)
    result = _run(
        "tools/convert_hf_to_megatron.py",
        "--hf-dir",
        str(tmp_path / "hf"),
        "--out-dir",
        str(tmp_path / "mcore"),
        "--tp",
        "2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "mcore" / "metis_checkpoint.json").exists()
    result = _run(
        "tools/convert_megatron_to_hf.py",
        "--ckpt-dir",
        str(tmp_path / "mcore"),
        "--out-dir",
        str(tmp_path / "back"),
        "--pp",
        "2",
    )
    assert result.returncode == 0, result.stderr[-2000:]

    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = {}
    for shard in sorted((tmp_path / "back").glob("*.safetensors")):
        after.update(load_file(str(shard)))
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.tensor([[1, 5, 9, 20, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, original(ids).logits)
        greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(reloaded.generate(ids, **greedy), original.generate(ids, **greedy))


def test_tool_errors_are_one_clear_line(tmp_path):
    result = _run(
        "tools/convert_megatron_to_hf.py",
        "--ckpt-dir",
        str(tmp_path / "nope"),
        "--out-dir",
        str(tmp_path / "out"),
    )
    assert result.returncode == 1
    assert "is not a complete megatron_metis checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()
