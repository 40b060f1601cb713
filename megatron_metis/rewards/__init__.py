"""Verifiable rewards: answer extraction, exact fast paths, math-verify, batched pool scorer.

Pure Python plus math-verify/sympy; imports only ``megatron_metis.config`` (never ``data``).
"""

from megatron_metis.rewards.accuracy import accuracy_reward, prejudge
from megatron_metis.rewards.extract import Candidate, extract_candidate, format_reward, last_boxed
from megatron_metis.rewards.scorer import RewardScorer, ScoreBatch
from megatron_metis.rewards.verifier import Verdict

__all__ = [
    "Candidate",
    "RewardScorer",
    "ScoreBatch",
    "Verdict",
    "accuracy_reward",
    "extract_candidate",
    "format_reward",
    "last_boxed",
    "prejudge",
]
