"""Streaming the trainer's weights into the rollout engine, in bounded buckets, with checks.

``stream_weights`` consumes a stream of (HF name, full tensor) pairs, e.g. the collective
generator ``checkpoint.hf_convert.export_hf_weights`` (every rank calls it; each yields one
tensor at a time), groups it into buckets of at most ``bucket_bytes`` (a single larger tensor
forms a bucket of its own), hands each bucket to ``engine.load_weights`` and lets it go, so at
most one bucket is held at any time, never the whole model.

Checks (``RolloutConfig.verify_weights``):
    checksum   after loading a bucket, the engine's checksum of every tensor it now holds is
               compared with the trainer's (float64 sum, sum of squares, position-weighted
               sum), computed on the tensor cast to the engine's dtype;
    logprobs   after the stream, ``check_logprobs`` compares the engine's log-probs of a probe
               sequence with the trainer's (the trainer computes its own side).
A mismatch raises ``WeightSyncError`` naming the bucket and tensor: the run must stop rather
than train on samples from a different model.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_metis.rollout.engine import RolloutEngine, tensor_checksum

Verify = Literal["checksum", "logprobs", "none"]


class WeightSyncError(RuntimeError):
    """The rollout engine does not hold the trainer's weights."""


@dataclass(frozen=True)
class SyncReport:
    num_tensors: int
    num_buckets: int
    total_bytes: int
    max_bucket_bytes: int
    seconds: float

    def as_metrics(self) -> dict[str, float]:
        return {
            "weight_sync/tensors": float(self.num_tensors),
            "weight_sync/buckets": float(self.num_buckets),
            "weight_sync/mb": self.total_bytes / 2**20,
            "weight_sync/max_bucket_mb": self.max_bucket_bytes / 2**20,
            "weight_sync/seconds": self.seconds,
        }


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream into lists of at most ``bucket_bytes`` (a bigger tensor goes alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _verify_bucket(
    bucket: Sequence[tuple[str, torch.Tensor]], engine: RolloutEngine, index: int
) -> None:
    names = [name for name, _ in bucket]
    held = {c.name: c for c in engine.checksum(names)}
    for name, tensor in bucket:
        expected = tensor_checksum(name, tensor.to(engine.weight_dtype))
        got = held.get(name)
        if got is None or not expected.matches(got):
            raise WeightSyncError(
                f"weight sync: bucket {index}, tensor {name!r}: the rollout engine holds "
                f"{got} but the trainer sent {expected}"
            )


def stream_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    engine: RolloutEngine,
    *,
    bucket_bytes: int,
    verify: Verify = "checksum",
) -> SyncReport:
    """Load the trainer's weights into ``engine`` bucket by bucket.

    Args:
        named_tensors: (HF name, full tensor) pairs, consumed lazily.
        engine: the rollout engine (awake, or at least able to take weights).
        bucket_bytes: most bytes per bucket.
        verify: ``checksum`` checks every bucket; other values skip it (``logprobs`` is done
            by the caller with ``check_logprobs`` once the stream is complete).

    Raises:
        WeightSyncError: a checksum differs (the message names the bucket and the tensor).
    """
    start = time.perf_counter()
    num_tensors = num_buckets = total = biggest = 0
    for index, bucket in enumerate(iter_buckets(named_tensors, bucket_bytes)):
        engine.load_weights(bucket)
        if verify == "checksum":
            _verify_bucket(bucket, engine, index)
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        num_tensors += len(bucket)
        num_buckets += 1
        total += nbytes
        biggest = max(biggest, nbytes)
    return SyncReport(num_tensors, num_buckets, total, biggest, time.perf_counter() - start)


def check_logprobs(
    trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, *, atol: float
) -> float:
    """Compare the two sides' log-probs of the same probe sequence; return the max difference.

    Raises:
        WeightSyncError: shapes differ or some token differs by more than ``atol``.
    """
    a, b = trainer_logprobs.detach().float().cpu(), engine_logprobs.detach().float().cpu()
    if a.shape != b.shape:
        raise WeightSyncError(f"weight sync probe: shapes {tuple(a.shape)} != {tuple(b.shape)}")
    diff = (a - b).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if not worst <= atol:  # NaN fails too
        pos = int(diff.nan_to_num(float("inf")).argmax())
        raise WeightSyncError(
            f"weight sync probe: the rollout engine's log-probs differ from the trainer's by "
            f"{worst:.3g} > {atol} (token {pos}: trainer {float(a[pos]):.6f}, "
            f"engine {float(b[pos]):.6f})"
        )
    return worst
