"""TP=2 (two gloo processes): vocab-parallel results equal the full-vocabulary reference."""

from __future__ import annotations

import pytest
from test_fused_logprob import IMPLS
from tp_worker import run_rank

from megatron_metis.parallel import spawn


@pytest.mark.parametrize("impl", IMPLS)
def test_tp2_matches_full_vocab_reference(impl: str) -> None:
    spawn(run_rank, 2, impl, timeout_s=120)
