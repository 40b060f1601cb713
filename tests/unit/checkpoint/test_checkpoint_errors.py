"""Bad checkpoints give clear errors naming the file or tensor; nothing half-written is left."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_qwen2

from megatron_metis.checkpoint.dist_ckpt import check_architecture
from megatron_metis.checkpoint.hf_io import (
    AtomicDir,
    CheckpointError,
    HFCheckpointReader,
    write_safetensors_shards,
)
from megatron_metis.config import ConfigError, ModelConfig, ParallelConfig
from megatron_metis.models import Qwen2Arch
from megatron_metis.parallel import spawn


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    make_tiny_qwen2(path, tie_word_embeddings=False, num_layers=2)
    return path


def _variant(good_dir, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(good_dir, target)
    return target


def _load_errors(dirs: dict[str, str]) -> dict[str, str]:
    """In one single-rank job, try loading each folder; return each error message."""
    from megatron_metis.checkpoint import load_hf_weights
    from megatron_metis.models import build_model, read_hf_config
    from megatron_metis.parallel import init_parallel

    ctx = init_parallel(ParallelConfig())
    good = next(iter(dirs.values()))
    model, arch = build_model(read_hf_config(good), ctx, ModelConfig(dtype="float32"))
    errors = {}
    for tag, path in dirs.items():
        try:
            load_hf_weights(model, ctx, arch, path)
            errors[tag] = ""
        except CheckpointError as err:
            errors[tag] = str(err)
    ctx.destroy()
    return errors


def test_bad_hf_checkpoints_name_the_problem(good_dir, tmp_path):
    dirs = {"good": str(good_dir)}
    corrupt = _variant(good_dir, tmp_path, "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    dirs["corrupt"] = str(corrupt)
    missing_tensor = _variant(good_dir, tmp_path, "missing_tensor")
    tensors = load_file(str(missing_tensor / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(missing_tensor / "model.safetensors"))
    dirs["missing_tensor"] = str(missing_tensor)
    wrong_shape = _variant(good_dir, tmp_path, "wrong_shape")
    tensors = load_file(str(wrong_shape / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(tensors, str(wrong_shape / "model.safetensors"))
    dirs["wrong_shape"] = str(wrong_shape)
    missing_shard = _variant(good_dir, tmp_path, "missing_shard")
    names = list(load_file(str(missing_shard / "model.safetensors")))
    index = {"weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}
    (missing_shard / "model.safetensors.index.json").write_text(json.dumps(index))
    dirs["missing_shard"] = str(missing_shard)

    errors = spawn(_load_errors, 1, dirs, timeout_s=120)[0]
    assert errors["good"] == ""
    assert "corrupt/model.safetensors: unreadable safetensors file" in errors["corrupt"]
    assert "'model.layers.1.mlp.up_proj.weight' is missing" in errors["missing_tensor"]
    assert "'model.layers.0.self_attn.k_proj.weight' has shape [48, 64]" in errors["wrong_shape"]
    assert "expects [32, 64]" in errors["wrong_shape"]
    assert (
        "model-00002-of-00002.safetensors: file listed in the checkpoint is missing"
        in (errors["missing_shard"])
    )


def test_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor"):
        HFCheckpointReader(tmp_path)


def test_head_counts_not_divisible_by_tp_name_the_key(good_dir):
    arch = Qwen2Arch.from_hf_dir(good_dir)
    with pytest.raises(
        ConfigError, match="num_attention_heads=4 is not divisible by parallel.tp=3"
    ):
        arch.check_parallel(tp=3, pp=1)
    with pytest.raises(
        ConfigError, match="num_key_value_heads=2 is not divisible by parallel.tp=4"
    ):
        arch.check_parallel(tp=4, pp=1)
    with pytest.raises(ConfigError, match="num_hidden_layers=2 is not divisible by parallel.pp=4"):
        arch.check_parallel(tp=1, pp=4)


def test_missing_config_key_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="lacks the key 'num_attention_heads'"):
        Qwen2Arch.from_hf_dir(tmp_path)


def test_dist_checkpoint_of_another_architecture_is_refused(good_dir):
    arch = Qwen2Arch.from_hf_dir(good_dir)
    meta = {"arch": {**arch.__dict__, "hidden_size": 128, "num_layers": 3}}
    with pytest.raises(CheckpointError) as err:
        check_architecture(meta, arch, "ckpt/step_10")
    assert "hidden_size: checkpoint 128 vs model 64" in str(err.value)
    assert "num_layers: checkpoint 3 vs model 2" in str(err.value)


def test_failed_write_leaves_nothing_behind(tmp_path):
    def stream():
        yield "a", torch.zeros(4)
        raise RuntimeError("rank died mid-export")

    target = tmp_path / "hf_out"
    with pytest.raises(RuntimeError, match="mid-export"):
        with AtomicDir(target) as staging:
            write_safetensors_shards(stream(), staging.path, max_shard_bytes=8)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_sharded_write_respects_the_shard_size(tmp_path):
    tensors = [(f"t{i}", torch.full((10,), float(i))) for i in range(5)]
    weight_map = write_safetensors_shards(iter(tensors), tmp_path, max_shard_bytes=80)
    assert sorted(set(weight_map.values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    reader = HFCheckpointReader(tmp_path)
    assert torch.equal(reader.read("t3"), torch.full((10,), 3.0))
    assert torch.equal(reader.read("t4", rows=slice(2, 4)), torch.full((2,), 4.0))
