"""Config section of the training engine's loop, keys that mean the same in SFT and RL: rows
and packing, steps, evaluation, log-prob chunks. Each phase's batch size lives in its own
section (``sft.global_batch_size``; RL: ``grpo.num_prompts_per_step * grpo.group_size``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_metis.config.loader import ConfigError


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    micro_batch_size: int = 1
    """Rows per micro-batch (a row is one sample, or several packed samples)."""
    max_steps: int = 0
    """Optimizer steps of an SFT run (0: ``sft.epochs`` over the data); rollout steps of an RL
    run (must be >= 1 for ``metis rl``)."""
    max_tokens_per_row: int = 0
    """Token budget of a packed row (0: ``sft.max_seq_len`` for SFT, the longest prompt plus
    ``rollout.max_new_tokens`` for RL). With packing off, rows are padded samples."""
    pack_sequences: bool = True
    """Pack several samples (SFT conversations, RL responses) into one row of at most
    ``max_tokens_per_row`` tokens (block-diagonal attention, positions restart); off: one
    padded sample per row. Qwen2.5-VL samples pack too (M-RoPE ids are per sample)."""
    logprob_chunk_tokens: int = 1024
    """Tokens per chunk of the vocab-parallel log-softmax: the fp32 softmax is materialised for
    this many tokens at a time, never for the whole micro-batch (both ``logprob_impl``s)."""
    logprob_impl: Literal["logits", "fused"] = "logits"
    """How the trainer gets per-token log-probs (GRPO loss, old/reference log-probs, SFT loss,
    weight-stream checks): ``logits``: Megatron's output layer makes the vocab-parallel logits
    ``[B, S, V/tp]``, then a chunked log-softmax; ``fused``: the last stage returns its hidden
    states and the fused kernel (``megatron_metis.kernels.fused_logprob``) computes the
    log-probs from them and the output weight shard, never holding the logits. Same results
    up to fp32 summation order; any TP/PP, packed sequences, tied or untied embeddings."""
    fused_kernel: Literal["auto", "torch", "triton"] = "auto"
    """Backend of ``logprob_impl=fused``: ``auto`` (Triton on CUDA, chunked PyTorch on CPU),
    ``torch`` (chunked PyTorch) or ``triton``."""
    eval_interval: int = 0
    """Held-out accuracy (greedy, the rollout engine) every N steps (0: at the end only)."""
    eval_max_problems: int = 64
    """Test problems per evaluation (0: all of ``data.test_files``)."""
    eval_max_new_tokens: int = 0
    """Response budget of evaluation (0: ``rollout.max_new_tokens``)."""

    def validate(self) -> None:
        for key in ("micro_batch_size", "logprob_chunk_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in (
            "max_steps",
            "max_tokens_per_row",
            "eval_interval",
            "eval_max_problems",
            "eval_max_new_tokens",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.logprob_impl not in ("logits", "fused"):
            raise ConfigError(
                f"train.logprob_impl must be logits or fused, got {self.logprob_impl}"
            )
        if self.fused_kernel not in ("auto", "torch", "triton"):
            raise ConfigError(
                f"train.fused_kernel must be auto, torch or triton, got {self.fused_kernel}"
            )
