"""RL config sections (loading, validation) and import hygiene of the rollout seam."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_metis.config import ConfigError
from megatron_metis.config.loader import build_dataclass
from megatron_metis.config.rl import GRPOConfig, RolloutConfig
from megatron_metis.config.sft import SFTConfig
from megatron_metis.rollout.client import sampling_params


def test_defaults_follow_the_recipe():
    grpo = build_dataclass(GRPOConfig, {}, prefix="grpo")
    assert (grpo.group_size, grpo.eps_low, grpo.eps_high, grpo.kl_coef) == (8, 0.2, 0.28, 0.0)
    assert grpo.loss_agg == "token_mean" and grpo.norm_std and grpo.dynamic_sampling
    rollout = build_dataclass(RolloutConfig, {"stop": ["</answer>", "<|endoftext|>"]})
    assert rollout.stop == ("</answer>", "<|endoftext|>") and rollout.temperature == 1.0
    params = sampling_params(rollout, n=8)
    assert params.n == 8 and params.stop == rollout.stop
    assert build_dataclass(SFTConfig, {}).loss_norm == "token"


@pytest.mark.parametrize(
    ("cls", "raw", "key"),
    [
        (GRPOConfig, {"group_size": 1}, "grpo.group_size"),
        (GRPOConfig, {"eps_low": 1.0}, "grpo.eps_low"),
        (GRPOConfig, {"loss_agg": "sum"}, "grpo.loss_agg"),
        (GRPOConfig, {"max_sampling_rounds": 0}, "grpo.max_sampling_rounds"),
        (RolloutConfig, {"top_p": 0.0}, "rollout.top_p"),
        (RolloutConfig, {"backend": "vllm"}, "rollout.verify_weights"),
        (SFTConfig, {"epochs": 0}, "sft.epochs"),
    ],
)
def test_invalid_values_name_the_key(cls, raw, key):
    section = key.split(".")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_dataclass(cls, raw, prefix=section)


def test_vllm_backend_with_logprob_check_is_valid():
    cfg = build_dataclass(RolloutConfig, {"backend": "vllm", "verify_weights": "logprobs"})
    assert cfg.backend == "vllm"


def test_rollout_and_algorithms_import_without_vllm_or_each_other():
    code = (
        "import sys\n"
        "import megatron_metis.rollout, megatron_metis.rollout.vllm_engine\n"
        "import megatron_metis.rollout.hf_engine\n"
        "assert 'vllm' not in sys.modules\n"
        "assert 'megatron_metis.algorithms' not in sys.modules\n"
        "for m in list(sys.modules):\n"
        "    if m.startswith('megatron_metis.rollout'): del sys.modules[m]\n"
        "import megatron_metis.algorithms\n"
        "bad = [m for m in sys.modules if m.startswith(('megatron.core', 'megatron_metis.rollout',"
        " 'megatron_metis.trainer', 'megatron_metis.models', 'megatron_metis.parallel'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
