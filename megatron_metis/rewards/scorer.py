"""Batched reward scoring for training: fast paths in the caller, math-verify in a worker pool.

math-verify times out with ``signal.alarm``, so it runs in worker processes (forkserver or
spawn, never fork: the trainer has torch and threads), one job at a time in each worker's main
thread. Each worker answers job by job, so the parent knows which job a worker is on; a worker
still on one job ``timeout_s + kill_grace_s`` after it started is killed and replaced, and that
job scores 0 (``n_timeout``). A worker that dies scores its job 0 (``n_verifier_error``). Jobs
still open at the batch deadline score 0. ``score`` therefore always returns.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import Any

from megatron_metis.config.rewards import RewardConfig
from megatron_metis.rewards.accuracy import Route, prejudge
from megatron_metis.rewards.extract import format_reward
from megatron_metis.rewards.verifier import GoldCache, Verdict, quiet_math_verify, verify_answer
from megatron_metis.rewards.worker import Job, VerifyFn, worker_main

_WORKER_MODULE = "megatron_metis.rewards.worker"
_VERDICT_COUNTERS = {
    Verdict.GOLD_UNPARSEABLE: "n_gold_unparseable",
    Verdict.TIMEOUT: "n_timeout",
    Verdict.ERROR: "n_verifier_error",
}


@dataclass(frozen=True)
class ScoreBatch:
    """Rewards of one batch, index-aligned with the responses.

    Attributes:
        rewards: ``accuracy_weight * accuracy + format_weight * format``.
        accuracy: 0/1 accuracy rewards.
        format: 0/1 format rewards.
        metrics: counters (``n_fast_path``, ``n_verifier``, ``n_timeout``,
            ``n_verifier_error``, ``n_gold_unparseable``, ``n_no_answer``, ``n_too_complex``,
            ``n_worker_restarts``...), means and ``seconds``.
    """

    rewards: list[float]
    accuracy: list[float]
    format: list[float]
    metrics: dict[str, float]


@dataclass
class _Worker:
    process: Any
    conn: Connection
    pending: deque[int] = field(default_factory=deque)
    since: float = 0.0


class RewardScorer:
    """Scores (response, gold) batches with a pool of verifier processes.

    Use as a context manager (``with RewardScorer(cfg) as scorer: scorer.score(...)``) or call
    ``close()``; workers start on first use.

    Args:
        cfg: the ``rewards`` config section.
        verify_fn: the per-job verifier (a module-level function; tests inject hanging ones).
    """

    def __init__(self, cfg: RewardConfig, *, verify_fn: VerifyFn = verify_answer) -> None:
        cfg.validate()
        self._cfg = cfg
        self._verify_fn = verify_fn
        self._workers: list[_Worker] = []
        self._local_cache = GoldCache(cfg.gold_cache_size)
        self._restarts = 0

    def __enter__(self) -> RewardScorer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker processes (idempotent)."""
        while len(self._workers) < self._cfg.num_workers:
            self._workers.append(self._spawn())

    def close(self) -> None:
        """Stop the workers: ask politely, then kill those that do not exit within 2 s."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=2.0)
            self._kill(worker)
        self._workers = []

    def score(
        self,
        responses: Sequence[str],
        golds: Sequence[str],
        *,
        choices: Sequence[Sequence[str] | None] | None = None,
    ) -> ScoreBatch:
        """Accuracy, format and weighted rewards of ``responses`` against ``golds``.

        Args:
            responses: model responses.
            golds: gold answers, one per response.
            choices: per response, the texts of its choices (or None), or None for all.
        """
        if len(golds) != len(responses):
            raise ValueError(f"golds: {len(golds)} items for {len(responses)} responses")
        if choices is not None and len(choices) != len(responses):
            raise ValueError(f"choices: {len(choices)} items for {len(responses)} responses")
        start = time.monotonic()
        counts: Counter[str] = Counter()
        accuracy = [0.0] * len(responses)
        jobs: dict[tuple[str, str], list[int]] = {}
        for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
            pre = prejudge(
                response,
                gold,
                choices=None if choices is None else choices[i],
                max_answer_chars=self._cfg.max_answer_chars,
                max_answer_depth=self._cfg.max_answer_depth,
            )
            counts[f"n_{pre.route.value}"] += 1
            if pre.candidate is not None:
                jobs.setdefault((pre.candidate.verifier_input, gold), []).append(i)
            elif pre.verdict is Verdict.CORRECT:
                accuracy[i] = 1.0
        keys = list(jobs)
        for key, verdict in zip(keys, self._verify_all(keys), strict=True):
            for i in jobs[key]:
                accuracy[i] = 1.0 if verdict is Verdict.CORRECT else 0.0
                if verdict in _VERDICT_COUNTERS:
                    counts[_VERDICT_COUNTERS[verdict]] += 1
        counts["n_verifier_unique"] = len(keys)
        return self._finish(responses, accuracy, counts, time.monotonic() - start)

    def _finish(
        self, responses: Sequence[str], accuracy: list[float], counts: Counter[str], seconds: float
    ) -> ScoreBatch:
        fmt = [format_reward(r) for r in responses]
        rewards = [
            self._cfg.accuracy_weight * a + self._cfg.format_weight * f
            for a, f in zip(accuracy, fmt, strict=True)
        ]
        n = max(1, len(responses))
        metrics: dict[str, float] = {
            "n_responses": float(len(responses)),
            "n_worker_restarts": float(self._restarts),
            "accuracy_mean": sum(accuracy) / n,
            "format_mean": sum(fmt) / n,
            "reward_mean": sum(rewards) / n,
            "seconds": seconds,
        }
        for key in (
            "n_fast_path",
            "n_verifier",
            "n_verifier_unique",
            "n_no_answer",
            "n_too_complex",
        ):
            metrics[key] = float(counts[key])
        for key in _VERDICT_COUNTERS.values():
            metrics[key] = float(counts[key])
        metrics["n_gold_unparseable"] += counts[f"n_{Route.GOLD_UNPARSEABLE.value}"]
        return ScoreBatch(rewards=rewards, accuracy=accuracy, format=fmt, metrics=metrics)

    def _verify_all(self, jobs: list[tuple[str, str]]) -> list[Verdict]:
        if not jobs:
            return []
        if self._cfg.num_workers == 0:
            quiet_math_verify()
            return [
                self._verify_fn(a, g, timeout_s=self._cfg.timeout_s, cache=self._local_cache)
                for a, g in jobs
            ]
        self.start()
        return self._run_pool(jobs)

    def _run_pool(self, jobs: list[tuple[str, str]]) -> list[Verdict]:
        results: list[Verdict | None] = [None] * len(jobs)
        queue: deque[int] = deque(range(len(jobs)))
        chunk = max(1, min(self._cfg.chunk_size, math.ceil(len(jobs) / (4 * len(self._workers)))))
        deadline = time.monotonic() + self._cfg.batch_timeout_s
        job_limit = self._cfg.timeout_s + self._cfg.kill_grace_s
        while queue or any(w.pending for w in self._workers):
            for worker in self._workers:
                if not worker.pending and queue:
                    self._assign(worker, queue, chunk, jobs)
            busy = [w for w in self._workers if w.pending]
            now = time.monotonic()
            if now >= deadline:
                self._expire(busy, queue, results)
                break
            wake = min([deadline] + [w.since + job_limit for w in busy])
            ready = wait([w.conn for w in busy], timeout=max(0.0, wake - now))
            for worker in busy:
                if worker.conn in ready:
                    self._drain(worker, queue, results)
            now = time.monotonic()
            for worker in busy:
                if worker.pending and now - worker.since > job_limit:
                    self._replace(worker, queue, results, Verdict.TIMEOUT)
        return [Verdict.TIMEOUT if r is None else r for r in results]

    def _assign(
        self, worker: _Worker, queue: deque[int], chunk: int, jobs: list[tuple[str, str]]
    ) -> None:
        ids = [queue.popleft() for _ in range(min(chunk, len(queue)))]
        payload: list[Job] = [(i, jobs[i][0], jobs[i][1]) for i in ids]
        worker.pending.extend(ids)
        worker.since = time.monotonic()
        try:
            worker.conn.send(payload)
        except (OSError, ValueError):  # died while idle: replace it and requeue its jobs
            self._replace(worker, queue, [], Verdict.ERROR, requeue_all=True)

    def _drain(self, worker: _Worker, queue: deque[int], results: list[Verdict | None]) -> None:
        try:
            while worker.pending and worker.conn.poll():
                job_id, verdict = worker.conn.recv()
                if job_id != worker.pending[0]:
                    raise RuntimeError(f"verifier worker answered job {job_id} out of order")
                worker.pending.popleft()
                results[job_id] = Verdict(verdict)
                worker.since = time.monotonic()
        except (EOFError, OSError):
            self._replace(worker, queue, results, Verdict.ERROR)

    def _replace(
        self,
        worker: _Worker,
        queue: deque[int],
        results: list[Verdict | None],
        verdict: Verdict,
        *,
        requeue_all: bool = False,
    ) -> None:
        """Kill ``worker``; its current job gets ``verdict``, its other jobs go back in line."""
        if worker.pending and not requeue_all:
            results[worker.pending.popleft()] = verdict
        queue.extendleft(reversed(worker.pending))
        self._kill(worker)
        fresh = self._spawn()
        worker.process, worker.conn, worker.pending = fresh.process, fresh.conn, deque()
        self._restarts += 1

    def _expire(
        self, busy: list[_Worker], queue: deque[int], results: list[Verdict | None]
    ) -> None:
        for worker in busy:
            for job_id in worker.pending:
                results[job_id] = Verdict.TIMEOUT
            worker.pending.clear()
            self._replace(worker, queue, results, Verdict.TIMEOUT)
        for job_id in queue:
            results[job_id] = Verdict.TIMEOUT
        queue.clear()

    def _spawn(self) -> _Worker:
        ctx = mp.get_context(self._cfg.start_method)
        if self._cfg.start_method == "forkserver":
            ctx.set_forkserver_preload([_WORKER_MODULE])
        parent, child = ctx.Pipe(duplex=True)
        args = (child, self._cfg.timeout_s, self._cfg.gold_cache_size, self._verify_fn)
        process = ctx.Process(target=worker_main, args=args, daemon=True, name="metis-verifier")
        process.start()
        child.close()
        return _Worker(process=process, conn=parent)

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5.0)
        worker.conn.close()
