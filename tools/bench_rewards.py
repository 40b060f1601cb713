"""Throughput of the reward scorer against a plain math-verify process pool on the same mix.

Generates a seeded mix of easy answers (integers, choice letters, fractions vs decimals, text)
and harder or pathological ones (radicals, intervals, sets, garbage, a 10^5-digit number, deep
braces, a power tower that only a timeout stops), scores it with ``RewardScorer`` and with a
``ProcessPoolExecutor`` that runs parse+verify on every pair, and prints responses/s of both.

    python tools/bench_rewards.py --n 4000 --workers 2
"""

from __future__ import annotations

import argparse
import math
import random
import time
from concurrent.futures import ProcessPoolExecutor

from megatron_metis.config.rewards import RewardConfig
from megatron_metis.rewards import RewardScorer
from megatron_metis.rewards.extract import answer_span


def _wrap(body: str, rng: random.Random) -> str:
    think = "<think>" + " ".join(rng.choice(["so", "then", "we", "add", "3"]) for _ in range(40))
    return f"{think}</think><answer>The answer is $\\boxed{{{body}}}$</answer>"


def _easy(rng: random.Random) -> tuple[str, str]:
    kind = rng.random()
    if kind < 0.45:
        gold = rng.randint(0, 999)
        return str(gold), str(gold if rng.random() < 0.5 else gold + rng.randint(1, 9))
    if kind < 0.65:
        gold = rng.choice("ABCD")
        return gold, rng.choice([gold, "ABCD"[rng.randint(0, 3)], f"({gold})", f"option {gold}"])
    if kind < 0.85:
        a, b = rng.randint(1, 9), rng.choice([2, 4, 5, 8])
        pred = str(a / b) if rng.random() < 0.5 else f"\\frac{{{a * 2}}}{{{b * 2}}}"
        return f"\\frac{{{a}}}{{{b}}}", pred
    word = rng.choice(["yes", "no", "triangle", "square", "red", "blue"])
    return word, rng.choice([word, word.capitalize(), "circle"])


def _hard(rng: random.Random) -> tuple[str, str]:
    kind = rng.random()
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if kind < 0.3:
        return f"{a}\\sqrt{{{b}}}", rng.choice([f"\\sqrt{{{a * a * b}}}", f"{b}\\sqrt{{{a}}}"])
    if kind < 0.5:
        return f"[{a}, {a + b})", rng.choice([f"[{a},{a + b})", f"({a},{a + b})"])
    if kind < 0.65:
        return f"\\{{{a},{b}\\}}", f"\\{{{b},{a}\\}}"
    if kind < 0.8:
        return f"{a}\\pi", rng.choice([f"\\frac{{{2 * a}\\pi}}{{2}}", f"{a * 3.14:.2f}"])
    return f"(x+{a})^2", rng.choice([f"x^2+{2 * a}x+{a * a}", f"x^2+{a * a}"])


def _pathological(rng: random.Random) -> str:
    return rng.choice(
        [
            "9" * 100_000,
            "{" * 200 + "1" + "}" * 200,
            "\\frac{" * 40 + "1}{2}" * 40,
            bytes(rng.randrange(256) for _ in range(2000)).decode("latin-1").replace("}", ""),
        ]
    )


def build_mix(
    n: int, *, seed: int, hard: float, pathological: float, towers: int
) -> tuple[list[str], list[str]]:
    """``n`` (response, gold) pairs; ``towers`` of them need a timeout to stop."""
    rng = random.Random(seed)
    responses, golds = [], []
    for i in range(n):
        roll = rng.random()
        if i < towers:
            gold, pred = "2", "2^{2^{2^{2^{2^{100}}}}}"
        elif roll < pathological:
            gold, pred = str(rng.randint(0, 9)), _pathological(rng)
        elif roll < pathological + hard:
            gold, pred = _hard(rng)
        else:
            gold, pred = _easy(rng)
        responses.append(_wrap(pred, rng))
        golds.append(gold)
    order = list(range(n))
    rng.shuffle(order)
    return [responses[i] for i in order], [golds[i] for i in order]


def _baseline_one(pair: tuple[str, str, int]) -> float:
    """What a plain math-verify reward does: parse gold and answer span, verify."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    response, gold, timeout = pair
    span = answer_span(response) or response
    try:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        pred = parse(
            span, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=timeout
        )
        return float(bool(gold_parsed) and verify(gold_parsed, pred, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001
        return 0.0


def run_baseline(responses: list[str], golds: list[str], workers: int, timeout: int) -> float:
    """Seconds a plain ``ProcessPoolExecutor`` math-verify pool takes on the mix."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_baseline_one, [("\\boxed{1}", "1", timeout)] * workers))  # warm up
        start = time.monotonic()
        pairs = [(r, g, timeout) for r, g in zip(responses, golds, strict=True)]
        list(pool.map(_baseline_one, pairs, chunksize=16))
        return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="responses in the mix")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of both pools")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hard", type=float, default=0.15, help="share of math-verify answers")
    parser.add_argument("--pathological", type=float, default=0.03, help="share of garbage")
    parser.add_argument("--towers", type=int, default=2, help="answers only a timeout stops")
    parser.add_argument("--timeout", type=float, default=3.0, help="per-response timeout (s)")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    responses, golds = build_mix(
        args.n, seed=args.seed, hard=args.hard, pathological=args.pathological, towers=args.towers
    )
    cfg = RewardConfig(num_workers=args.workers, timeout_s=args.timeout)
    with RewardScorer(cfg) as scorer:
        scorer.score(responses[:4], golds[:4])  # start the workers
        start = time.monotonic()
        batch = scorer.score(responses, golds)
        ours = time.monotonic() - start
    metrics = {k: int(v) for k, v in batch.metrics.items() if k.startswith("n_")}
    print(f"mix: {args.n} responses, {args.workers} workers, metrics: {metrics}")
    print(f"RewardScorer:          {args.n / ours:8.0f} responses/s ({ours:.2f} s)")
    if not args.skip_baseline:
        base = run_baseline(responses, golds, args.workers, max(1, math.ceil(args.timeout)))
        print(f"plain math-verify pool: {args.n / base:7.0f} responses/s ({base:.2f} s)")
        print(f"speed-up: {base / ours:.1f}x")


if __name__ == "__main__":
    main()
