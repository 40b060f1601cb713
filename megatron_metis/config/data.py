"""Config section of datasets and prompts (filled in by the data issue)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Dataset files (JSONL or Parquet) in the project's problem format."""
    test_files: list[str] = field(default_factory=list)
    max_prompt_tokens: int = 1024
