"""Config section of datasets and prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_metis.config.loader import ConfigError

METIS_SYSTEM_PROMPT = (
    "Solve the question. The user asks a question, and you solves it. You first thinks about the "
    "reasoning process in the mind and then provides the user with the answer. The answer is in "
    "latex format and wrapped in $...$. The final answer must be wrapped using the \\boxed{} "
    "command. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> Since $1+1=2$, so the answer is $2$. </think>"
    "<answer> The answer is $\\boxed{2}$ </answer>, which means assistant's output should start "
    "with <think> and end with </answer>."
)
"""The Metis-RISE system prompt, verbatim (typos included) from the official README."""


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Dataset files (JSONL or Parquet) in the project's problem format."""
    test_files: list[str] = field(default_factory=list)
    system_prompt: str = METIS_SYSTEM_PROMPT
    """System turn of every prompt; with an empty string the chat template adds its default one
    (Qwen2.5-VL: "You are a helpful assistant.")."""
    max_prompt_tokens: int = 1024
    """A prompt (system + user turn + image tokens) longer than this is a bad row."""
    on_bad_row: Literal["error", "skip"] = "error"
    """``error``: stop at the first bad row; ``skip``: drop bad rows, count and log them."""
    image_min_pixels: int = 128 * 28 * 28
    """Qwen2.5-VL smart-resize lower bound (paper's best practice; tiny recipes use 56*56)."""
    image_max_pixels: int = 16384 * 28 * 28
    """Qwen2.5-VL smart-resize upper bound."""
    train_modality: Literal["all", "image", "text"] = "all"
    """Which rows of ``train_files`` a training phase (``metis rl``, ``metis sft``) uses: all,
    only those with an image, or only text-only ones (the paper's RL-data ablation). Test
    files are never filtered."""

    def validate(self) -> None:
        if self.max_prompt_tokens < 1:
            raise ConfigError(f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.image_min_pixels < 1:
            raise ConfigError(f"data.image_min_pixels must be >= 1, got {self.image_min_pixels}")
        if self.image_max_pixels < self.image_min_pixels:
            raise ConfigError(
                f"data.image_max_pixels ({self.image_max_pixels}) must be >= "
                f"data.image_min_pixels ({self.image_min_pixels})"
            )
