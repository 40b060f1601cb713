"""Body of a verifier worker process (imported by the forkserver so math-verify loads once)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from multiprocessing.connection import Connection

from megatron_metis.rewards.verifier import GoldCache, Verdict, quiet_math_verify, verify_answer

Job = tuple[int, str, str]
"""(job id, answer for math-verify, gold answer)."""
VerifyFn = Callable[..., Verdict]
"""``verify_answer``'s signature: (answer, gold, *, timeout_s, cache) -> Verdict."""


def worker_main(
    conn: Connection,
    timeout_s: float,
    gold_cache_size: int,
    verify_fn: VerifyFn = verify_answer,
) -> None:
    """Verify the chunks of jobs received on ``conn``; reply ``(job id, Verdict)`` per job, in
    order, so the parent always knows which job a stuck or dead worker was on. ``None`` stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    quiet_math_verify()
    cache = GoldCache(gold_cache_size)
    while True:
        try:
            chunk: list[Job] | None = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for job_id, answer, gold in chunk:
            verdict = verify_fn(answer, gold, timeout_s=timeout_s, cache=cache)
            conn.send((job_id, int(verdict)))
