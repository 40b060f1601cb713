"""vLLM's external launcher inside a job started the way ``srun`` starts it: torchrun's
``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` are absent, only Slurm's variables are set (vLLM reads
``RANK`` and ``LOCAL_RANK`` and failed with a KeyError before the engine exported them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_metis.parallel.env import find_free_port

pytestmark = pytest.mark.vllm

_RANK_BODY = """
import sys
from megatron_metis.config import ParallelConfig
from megatron_metis.config.rl import RolloutConfig
from megatron_metis.parallel import init_parallel
from megatron_metis.rollout import RolloutRequest, SamplingParams, build_rollout_engine

ctx = init_parallel(ParallelConfig(device="cpu"))
assert ctx.env.launcher == "slurm", ctx.env
cfg = RolloutConfig(
    backend="vllm",
    dtype="float32",
    verify_weights="logprobs",
    vllm_overrides={"enforce_eager": True, "kv_cache_memory_bytes": 1 << 26, "max_model_len": 256},
)
engine = build_rollout_engine(cfg, sys.argv[1], device=ctx.device)
out = engine.generate([RolloutRequest(prompt_ids=[1, 2, 3])], SamplingParams(max_new_tokens=4))
print("GENERATED", len(out[0].token_ids))
engine.close()
"""


def test_the_engine_starts_under_srun_variables_only(tmp_path):
    from megatron_metis.models.tiny import build_tiny_qwen2_5_vl

    hf = build_tiny_qwen2_5_vl(tmp_path / "hf", hidden_size=128, num_layers=1)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(
        SLURM_PROCID="0",
        SLURM_NTASKS="1",
        SLURM_LOCALID="0",
        SLURM_JOB_NODELIST="127.0.0.1",
        MASTER_PORT=str(find_free_port()),
    )
    out = subprocess.run(
        [sys.executable, "-c", _RANK_BODY, str(hf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "GENERATED 4" in out.stdout
