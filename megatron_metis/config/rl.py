"""Config sections of the RL phase: the GRPO variant and the rollout engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_metis.config.loader import ConfigError


@dataclass(kw_only=True, frozen=True)
class GRPOConfig:
    group_size: int = 8
    """Responses sampled per prompt; advantages are normalised inside each group."""
    num_prompts_per_step: int = 32
    """Groups (prompts) in one rollout batch after dynamic-sampling filtering."""
    eps_low: float = 0.2
    """Lower clip: the ratio is clipped at ``1 - eps_low`` (DAPO default)."""
    eps_high: float = 0.28
    """Upper clip: the ratio is clipped at ``1 + eps_high``; > eps_low is DAPO's clip-higher."""
    adv_eps: float = 1e-6
    """Added to the group standard deviation: ``(R - mean) / (std + adv_eps)``."""
    norm_std: bool = True
    """Divide advantages by the group std; False gives Dr. GRPO's ``R - mean``."""
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    """``token_mean``: sum over the valid tokens of the global batch / their count (DAPO);
    ``seq_mean``: each response's token mean, averaged over the responses (original GRPO)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference model; 0 loads no reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (Schulman's k1 = log-ratio, k2 = half squared, k3 = unbiased >= 0)."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal (zero advantage) and sample more prompts."""
    filter_on: Literal["reward", "accuracy"] = "reward"
    """What "all equal" is judged on. ``reward``: the shaped reward (DAPO); ``accuracy``: the
    verifier's 0/1 accuracy alone (MM-EUREKA's online accuracy filter), which also drops the
    groups that are all wrong or all right but differ in format, so every kept group carries an
    accuracy signal."""
    max_sampling_rounds: int = 4
    """Most generation rounds per step when filtering; a batch not full by then is trained
    as it is (the metrics report it)."""
    overlong: Literal["none", "mask", "penalty"] = "none"
    """Truncated responses: ``mask`` leaves them out of the loss (they still count in their
    group's advantages); ``penalty`` adds DAPO's soft overlong penalty to the reward."""
    overlong_buffer_tokens: int = 256
    """Penalty ramps linearly from 0 to ``-overlong_penalty_factor`` over the last this many
    tokens before ``rollout.max_new_tokens``."""
    overlong_penalty_factor: float = 1.0
    num_update_steps: int = 1
    """Optimizer steps per rollout batch: the batch is split into this many mini-batches; the
    trainer recomputes the old log-probs once, before the first."""

    def validate(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size must be >= 2, got {self.group_size}")
        if not 0.0 <= self.eps_low < 1.0:
            raise ConfigError(f"grpo.eps_low must be in [0, 1), got {self.eps_low}")
        if self.eps_high < 0.0:
            raise ConfigError(f"grpo.eps_high must be >= 0, got {self.eps_high}")
        if self.adv_eps <= 0.0:
            raise ConfigError(f"grpo.adv_eps must be > 0, got {self.adv_eps}")
        if self.kl_coef < 0.0:
            raise ConfigError(f"grpo.kl_coef must be >= 0, got {self.kl_coef}")
        if self.overlong_penalty_factor < 0.0:
            raise ConfigError("grpo.overlong_penalty_factor must be >= 0")
        for key in (
            "num_prompts_per_step",
            "max_sampling_rounds",
            "overlong_buffer_tokens",
            "num_update_steps",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"grpo.{key} must be >= 1, got {getattr(self, key)}")


@dataclass(kw_only=True, frozen=True)
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    """``hf``: transformers generation (CPU, small GPU runs); ``vllm``: colocated vLLM (GPU)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer computes log-probs at the same temperature. 0: greedy."""
    top_p: float = 1.0
    """Nucleus sampling; reported log-probs are of the tempered distribution before top-p."""
    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ("</answer>",)
    """Generation stops after any of these strings (kept in the response) or at EOS."""
    generation_batch_size: int = 64
    """Sequences per generation batch of the ``hf`` backend."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Weights of the rollout model (the streamed weights are cast to it)."""
    verify_weights: Literal["checksum", "logprobs", "none"] = "checksum"
    """After each weight stream: ``checksum`` compares per-tensor checksums bucket by bucket;
    ``logprobs`` compares the engine's log-probs of a probe sequence with the trainer's
    (the only check the ``vllm`` backend supports)."""
    verify_logprobs_atol: float = 1e-3
    """Tolerance of the ``logprobs`` check (bf16 engines differ from the trainer by ~1e-2 at
    worst; fp32 agree to ~1e-6)."""
    seed: int = 0
    vllm_tensor_parallel_size: int = 1
    vllm_gpu_memory_utilization: float = 0.5
    vllm_sleep_level: Literal[1, 2] = 1
    """1: weights offloaded to CPU during training; 2: discarded (the stream restores them)."""
    vllm_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra ``vllm.LLM(...)`` keyword arguments, forwarded verbatim."""

    def validate(self) -> None:
        if self.temperature < 0.0:
            raise ConfigError(f"rollout.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        for key in (
            "max_new_tokens",
            "generation_batch_size",
            "vllm_tensor_parallel_size",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"rollout.{key} must be >= 1, got {getattr(self, key)}")
        if any(not s for s in self.stop):
            raise ConfigError("rollout.stop must not contain empty strings")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ConfigError("rollout.vllm_gpu_memory_utilization must be in (0, 1]")
        if self.verify_logprobs_atol <= 0.0:
            raise ConfigError("rollout.verify_logprobs_atol must be > 0")
        if self.backend == "vllm" and self.verify_weights == "checksum":
            raise ConfigError(
                "rollout.verify_weights=checksum is not available with rollout.backend=vllm "
                "(vLLM holds fused, sharded weights): use 'logprobs'"
            )
