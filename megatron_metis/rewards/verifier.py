"""math-verify behind one call: (answer, gold) -> Verdict, with a cache of parsed golds.

math-verify times out with ``signal.alarm``, so these functions must run in the main thread of
a process: the scorer's worker processes, or the caller's main thread for ``accuracy_reward``.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections import OrderedDict
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_GOLD_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_PRED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


class Verdict(enum.IntEnum):
    """Outcome of verifying one answer; only CORRECT scores 1."""

    WRONG = 0
    CORRECT = 1
    GOLD_UNPARSEABLE = 2
    TIMEOUT = 3
    ERROR = 4


class GoldCache:
    """LRU cache of parsed gold answers (parsing a gold costs as much as parsing an answer)."""

    def __init__(self, max_size: int = 4096) -> None:
        self._max_size = max_size
        self._items: OrderedDict[str, list[Any]] = OrderedDict()

    def get(self, gold: str, timeout_s: int) -> list[Any]:
        """Parsed ``gold`` (an empty list when it cannot be parsed)."""
        parsed = self._items.get(gold)
        if parsed is None:
            parsed = parse(wrap_gold(gold), list(_GOLD_CONFIG), parsing_timeout=timeout_s)
            self._items[gold] = parsed
            if len(self._items) > self._max_size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(gold)
        return parsed


def wrap_gold(gold: str) -> str:
    """Gold answers are bare LaTeX: put them in math mode unless they already are."""
    return gold if "$" in gold or "\\boxed" in gold or "\\(" in gold else f"${gold}$"


def quiet_math_verify() -> None:
    """math-verify logs a warning per timeout; the scorer counts them instead."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


def verify_answer(answer: str, gold: str, *, timeout_s: float, cache: GoldCache) -> Verdict:
    """Parse ``gold`` (cached) and ``answer`` with math-verify and compare them.

    Args:
        answer: what math-verify parses from the response (``Candidate.verifier_input``).
        gold: the dataset's gold answer.
        timeout_s: budget; math-verify's own parse and compare timeouts use its ceiling.
        cache: parsed golds of this process.
    """
    seconds = max(1, math.ceil(timeout_s))
    start = time.monotonic()
    try:
        gold_parsed = cache.get(gold, seconds)
        if not gold_parsed:
            return Verdict.GOLD_UNPARSEABLE
        pred_parsed = parse(answer, list(_PRED_CONFIG), parsing_timeout=seconds)
        ok = bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=seconds)
    except Exception:  # noqa: BLE001 - a verifier crash scores 0 and is counted
        return Verdict.ERROR
    if ok:
        return Verdict.CORRECT
    # math-verify swallows its own timeouts and returns False: recognise them by the clock.
    return Verdict.TIMEOUT if time.monotonic() - start >= seconds else Verdict.WRONG
