"""Running a training phase on this process's rank (what ``metis sft``/``rl`` and the pipeline
start on every rank)."""

from __future__ import annotations

from megatron_metis.config import MetisConfig


def run_phase_on_rank(phase: str, cfg: MetisConfig, threads: int) -> dict[str, float]:
    """Run ``phase`` (``sft`` or ``rl``) on this rank; ``threads`` > 0 sets torch's CPU threads.

    Returns the final metrics of the phase.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if phase == "sft":
        from megatron_metis.trainer.sft import run_sft

        return run_sft(cfg)
    if phase == "rl":
        from megatron_metis.trainer.rl import run_rl

        return run_rl(cfg)
    raise ValueError(f"unknown training phase {phase!r} (sft or rl)")
