"""Datasets: the problem format (JSONL/Parquet), validation, chat messages, synthetic tasks and
the tiny offline tokenizer. Imports only ``megatron_metis.config`` (never ``rewards``).

Heavy submodules (``tokenizer``, ``synth``) are imported from their own modules.
"""

from megatron_metis.data.check import (
    BadRow,
    DatasetError,
    LoadResult,
    check_files,
    load_problems,
    load_training_problems,
)
from megatron_metis.data.messages import (
    build_messages,
    count_prompt_tokens,
    image_token_count,
    render_prompt,
)
from megatron_metis.data.schema import Problem, RowError, problem_from_row

__all__ = [
    "BadRow",
    "DatasetError",
    "LoadResult",
    "Problem",
    "RowError",
    "build_messages",
    "check_files",
    "count_prompt_tokens",
    "image_token_count",
    "load_problems",
    "load_training_problems",
    "problem_from_row",
    "render_prompt",
]
