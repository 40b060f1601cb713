"""The typed config tree: strict keys and types, overrides, base recipes, resolved dump."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from megatron_metis.config import ConfigError, MetisConfig, load_config, save_resolved_config
from megatron_metis.config.loader import MOVED_KEYS


def test_defaults_and_overrides():
    cfg = load_config(None, ["parallel.tp=2", "optimizer.lr=1e-5", "model.dtype=float32"])
    assert isinstance(cfg, MetisConfig)
    assert cfg.parallel.tp == 2 and cfg.parallel.pp == 1
    assert cfg.optimizer.lr == pytest.approx(1e-5)
    assert cfg.model.dtype == "float32"


@pytest.mark.parametrize(
    "override,message",
    [
        ("parallel.tpp=2", "unknown config key(s): parallel.tpp"),
        ("nosuchsection.x=1", "unknown config key(s): nosuchsection"),
        ("parallel.tp=two", "parallel.tp: expected an integer, got 'two'"),
        ("parallel.tp=true", "parallel.tp: expected an integer"),
        ("model.dtype=fp64", "model.dtype: 'fp64' is not one of"),
        ("optimizer.lr=-1", "optimizer.lr must be > 0"),
        ("parallel.tp=0", "parallel.tp must be >= 1"),
        ("parallel=3", "parallel: expected a mapping"),
        ("notanoverride", "is not of the form section.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [
        ("train.global_batch_size", "sft.global_batch_size", 32),
        ("sft.pack_sequences", "train.pack_sequences", False),
    ],
)
def test_a_moved_key_is_an_error_that_names_its_new_key(tmp_path, old, new, value):
    """A recipe or override written before a key moved fails with the new name, which takes
    the value."""
    with pytest.raises(ConfigError, match=f"^{old} moved to {new}$"):
        load_config(None, [f"{old}={value}"])
    section, key = old.split(".")
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({section: {key: value}}))
    with pytest.raises(ConfigError, match=f"^{old} moved to {new}$"):
        load_config(recipe)
    section, key = new.split(".")
    assert getattr(getattr(load_config(None, [f"{new}={value}"]), section), key) == value


def test_moved_keys_lead_from_a_gone_key_to_an_existing_one():
    def exists(dotted: str) -> bool:
        section, key = dotted.split(".")
        return key in {f.name for f in dataclasses.fields(getattr(MetisConfig(), section))}

    assert MOVED_KEYS
    for old, new in MOVED_KEYS.items():
        assert not exists(old) and exists(new), (old, new)


def test_moved_and_unknown_keys_are_both_reported():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.global_batch_size=8", "train.batch=8"])
    message = str(err.value)
    assert message.startswith("train.global_batch_size moved to sft.global_batch_size; ")
    assert "unknown config key(s): train.batch (valid: " in message


def test_recipe_with_base_and_resolved_dump_round_trips(tmp_path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({"parallel": {"tp": 2, "pp": 2}, "optimizer": {"lr": 3e-6}})
    )
    (tmp_path / "recipe.yaml").write_text(
        yaml.safe_dump({"base": "base.yaml", "parallel": {"pp": 1}, "run": {"name": "x"}})
    )
    cfg = load_config(tmp_path / "recipe.yaml", ["optimizer.warmup_steps=5"])
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.optimizer.lr) == (2, 1, 3e-6)
    assert cfg.run.name == "x" and cfg.optimizer.warmup_steps == 5
    path = save_resolved_config(cfg, tmp_path / "out")
    assert load_config(path) == cfg


def test_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optimizer:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="optimizer.learning_rate"):
        load_config(unknown)


def test_fp8_cannot_be_combined_with_local_layers():
    with pytest.raises(ConfigError, match="model.fp8 needs"):
        load_config(None, ["model.fp8=e4m3", "model.transformer_impl=local"])


def test_fp8_or_transformer_engine_without_a_gpu_is_a_clear_error():
    import torch

    from megatron_metis.models.specs import use_transformer_engine

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="model.fp8='e4m3' needs Transformer Engine on a CUDA"):
        use_transformer_engine(load_config(None, ["model.fp8=e4m3"]).model, cpu)
    with pytest.raises(ConfigError, match="transformer_impl=transformer_engine needs a CUDA"):
        use_transformer_engine(
            load_config(None, ["model.transformer_impl=transformer_engine"]).model, cpu
        )
    assert use_transformer_engine(load_config(None).model, cpu) is False


def test_a_removed_key_is_an_error_that_says_why():
    with pytest.raises(ConfigError, match=r"rollout.weight_bucket_mb was removed: .*one reload"):
        load_config(None, ["rollout.weight_bucket_mb=512"])


VLLM = ["rollout.backend=vllm", "rollout.verify_weights=logprobs"]


@pytest.mark.parametrize(
    ("tp", "vllm_tp", "ok"),
    [(2, 2, True), (4, 2, True), (2, 1, True), (1, 2, False), (4, 3, False)],
)
def test_a_vllm_engine_must_lie_inside_one_tensor_parallel_group(tp, vllm_tp, ok):
    """vLLM's external launcher makes blocks of consecutive ranks one engine: a block that
    crosses a TP group spans data-parallel replicas, which sample different prompts."""
    overrides = [*VLLM, f"parallel.tp={tp}", f"rollout.vllm_tensor_parallel_size={vllm_tp}"]
    if ok:
        assert load_config(None, overrides).rollout.vllm_tensor_parallel_size == vllm_tp
    else:
        with pytest.raises(ConfigError, match="must divide parallel.tp"):
            load_config(None, overrides)
    # the HF engine has no such groups
    load_config(None, [f"parallel.tp={tp}", f"rollout.vllm_tensor_parallel_size={vllm_tp}"])
