"""Synthetic multimodal reasoning tasks with verifiable answers and a programmatic expert."""

from megatron_metis.data.synth.build import SynthSummary, generate_rows, write_synthetic_dataset
from megatron_metis.data.synth.solver import expert_solution
from megatron_metis.data.synth.tasks import CATEGORIES, DIFFICULTIES, SynthProblem, generate

__all__ = [
    "CATEGORIES",
    "DIFFICULTIES",
    "SynthProblem",
    "SynthSummary",
    "expert_solution",
    "generate",
    "generate_rows",
    "write_synthetic_dataset",
]
