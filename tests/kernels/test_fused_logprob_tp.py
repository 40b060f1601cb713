"""TP=2 (two gloo processes): vocab-parallel results equal the full-vocabulary reference."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp
from test_fused_logprob import IMPLS
from tp_worker import run_rank

_JOIN_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_tp2_matches_full_vocab_reference(impl: str) -> None:
    context = mp.start_processes(
        run_rank, args=(2, _free_port(), impl), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + _JOIN_TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"TP=2 ranks did not finish in {_JOIN_TIMEOUT_S} s")
