"""Format reward, pathological inputs, and the pool scorer's timeouts, crashes and metrics."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pytest

from megatron_metis.config.loader import ConfigError, build_dataclass
from megatron_metis.config.rewards import RewardConfig
from megatron_metis.rewards import RewardScorer, accuracy_reward, format_reward

sys.path.insert(0, str(Path(__file__).parent))
from hanging_verifiers import hang_or_crash  # noqa: E402

GOOD = "<think>1+1=2</think><answer>The answer is $\\boxed{2}$</answer>"


@pytest.mark.parametrize(
    "response,expected",
    [
        (GOOD, 1.0),
        ("  <think>a</think>\n<answer>\\boxed{x}</answer>\n", 1.0),
        ("<think>a</think><answer>2</answer>", 0.0),  # no box
        ("<think>a</think><answer>\\boxed{}</answer>", 0.0),  # empty box
        ("<answer>\\boxed{2}</answer>", 0.0),  # no think
        ("<think></think><answer>\\boxed{2}</answer>", 0.0),  # empty think
        ("<think>a</think><think>b</think><answer>\\boxed{2}</answer>", 0.0),
        ("<think>a</think><answer>\\boxed{2}</answer><answer>\\boxed{3}</answer>", 0.0),
        ("<answer>\\boxed{2}</answer><think>a</think>", 0.0),  # wrong order
        ("<think>a</think><answer>\\boxed{2}</answer> trailing text", 0.0),
        ("preamble <think>a</think><answer>\\boxed{2}</answer>", 0.0),
        ("<think>a</think><answer>\\boxed{2</answer>", 0.0),  # unbalanced box
    ],
)
def test_format_reward(response: str, expected: float) -> None:
    assert format_reward(response) == expected


def _garbage(n: int) -> str:
    rng = random.Random(0)
    return bytes(rng.randrange(256) for _ in range(n)).decode("latin-1")


PATHOLOGICAL = [
    "<answer>\\boxed{" + "9" * 1_000_000 + "}</answer>",  # a 10^6-digit number
    "<answer>" + "7" * 1_000_000 + "</answer>",
    "\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}",  # deep braces
    "\\boxed{" + "\\frac{" * 60 + "1}{2}" * 60 + "}",  # \frac bomb
    "\\boxed{" + "\\frac{1}{" * 5000 + "2" + "}" * 5000 + "}",  # \frac bomb over the guard
    "\\boxed{2^{2^{2^{2^{2^{100}}}}}}",  # tower: math-verify times out
    "\\boxed{10^{10^{10}}!}",
    _garbage(100_000),
    "\\boxed{" + _garbage(500).replace("}", "") + "}",
    "\\boxed" * 100_000,  # many box commands, none closed
]


def test_pathological_inputs_score_zero_within_timeout(scorer: RewardScorer) -> None:
    start = time.monotonic()
    batch = scorer.score(PATHOLOGICAL, ["2"] * len(PATHOLOGICAL))
    elapsed = time.monotonic() - start
    assert batch.accuracy == [0.0] * len(PATHOLOGICAL)
    # 2 workers, 1 s per job + 0.5 s grace: the slow ones run in parallel
    assert elapsed < 8.0, elapsed
    assert batch.metrics["n_too_complex"] >= 5


def test_pathological_inputs_in_process_are_bounded() -> None:
    for response in PATHOLOGICAL:
        start = time.monotonic()
        assert accuracy_reward(response, "2", timeout_s=1.0) == 0.0
        assert time.monotonic() - start < 4.0, response[:40]


def test_hung_and_crashed_workers_score_zero_and_are_counted() -> None:
    cfg = RewardConfig(num_workers=2, timeout_s=0.5, kill_grace_s=0.3)
    responses = [f"\\boxed{{\\frac{{{i}}}{{3}}}}" for i in range(12)]
    responses[3] = "\\boxed{HANG}"
    responses[7] = "\\boxed{CRASH}"
    golds = ["\\frac{6}{3}"] * len(responses)
    with RewardScorer(cfg, verify_fn=hang_or_crash) as pool:
        start = time.monotonic()
        batch = pool.score(responses, golds)
        elapsed = time.monotonic() - start
        again = pool.score(responses[:3], golds[:3])  # the pool works after restarts
    assert elapsed < 5.0, elapsed
    assert batch.accuracy == [1.0 if i == 6 else 0.0 for i in range(12)]
    assert batch.metrics["n_timeout"] == 1
    assert batch.metrics["n_verifier_error"] == 1
    assert batch.metrics["n_worker_restarts"] == 2
    assert again.accuracy == [0.0, 0.0, 0.0]


def test_batch_deadline_scores_the_rest_zero() -> None:
    cfg = RewardConfig(num_workers=1, timeout_s=5.0, batch_timeout_s=0.5)
    with RewardScorer(cfg, verify_fn=hang_or_crash) as pool:
        start = time.monotonic()
        batch = pool.score(["\\boxed{HANG}", "\\boxed{\\sqrt{4}}"], ["2", "2"])
    assert time.monotonic() - start < 3.0
    assert batch.accuracy == [0.0, 0.0]
    assert batch.metrics["n_timeout"] == 2


def test_weights_duplicates_and_metrics(scorer: RewardScorer) -> None:
    responses = [GOOD, GOOD, "\\boxed{\\sqrt{4}}", "\\boxed{\\sqrt{4}}", "no answer"]
    batch = scorer.score(responses, ["2", "3", "2", "2", "2"])
    assert batch.accuracy == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert batch.format == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert batch.rewards == [1.5, 0.5, 1.0, 1.0, 0.0]
    assert batch.metrics["n_fast_path"] == 2
    assert batch.metrics["n_verifier"] == 2 and batch.metrics["n_verifier_unique"] == 1
    assert batch.metrics["n_no_answer"] == 1


def test_in_process_mode_and_bad_arguments() -> None:
    with RewardScorer(RewardConfig(num_workers=0)) as local:
        assert local.score(["\\boxed{\\sqrt{4}}"], ["2"]).accuracy == [1.0]
        with pytest.raises(ValueError, match="golds"):
            local.score(["a", "b"], ["1"])


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="rewards.timeout_s"):
        build_dataclass(RewardConfig, {"timeout_s": 0}, prefix="rewards")
    with pytest.raises(ConfigError, match="rewards.num_workers"):
        build_dataclass(RewardConfig, {"num_workers": -1}, prefix="rewards")
