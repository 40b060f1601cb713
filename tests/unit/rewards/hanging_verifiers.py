"""Verifiers that misbehave on purpose, importable by the scorer's worker processes."""

from __future__ import annotations

import os
import signal
import time

from megatron_metis.rewards.verifier import GoldCache, Verdict, verify_answer


def hang_or_crash(answer: str, gold: str, *, timeout_s: float, cache: GoldCache) -> Verdict:
    """Hangs (no alarms, so only the watchdog can stop it) on ``HANG``, dies on ``CRASH``."""
    if "HANG" in answer:
        signal.alarm(0)
        time.sleep(60)
    if "CRASH" in answer:
        os.kill(os.getpid(), signal.SIGKILL)
    return verify_answer(answer, gold, timeout_s=timeout_s, cache=cache)
