"""Streaming the trainer's weights into the rollout engine, with checks.

``stream_weights`` hands the engine a stream of (HF name, full tensor) pairs, e.g. the
collective generator ``checkpoint.hf_convert.export_hf_weights`` (every rank calls it; each
yields one tensor at a time), in one ``engine.load_weights`` call that consumes it lazily: at
most one gathered tensor (and what the engine buffers of one layer) is held at any time, never
the whole model. One call, because vLLM processes each layer once all its tensors have arrived
(a stream cut into separate calls would leave a layer half-loaded).

Checks (``RolloutConfig.verify_weights``):
    checksum   as each tensor passes, its checksum (float64 sum, sum of squares and a
               position-weighted sum of the tensor cast to the engine's dtype) is recorded;
               after the stream, the engine's checksum of every tensor it now holds must match;
    logprobs   after the stream, ``check_logprobs`` compares the engine's log-probs of a probe
               sequence with the trainer's (the trainer computes its own side).
A mismatch raises ``WeightSyncError`` naming the tensor: the run must stop rather than train on
samples from a different model.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_metis.rollout.engine import RolloutEngine, TensorChecksum, tensor_checksum

Verify = Literal["checksum", "logprobs", "none"]


class WeightSyncError(RuntimeError):
    """The rollout engine does not hold the trainer's weights."""


@dataclass(frozen=True)
class SyncReport:
    num_tensors: int
    total_bytes: int
    max_tensor_bytes: int
    seconds: float

    def as_metrics(self) -> dict[str, float]:
        return {
            "weight_sync/tensors": float(self.num_tensors),
            "weight_sync/mb": self.total_bytes / 2**20,
            "weight_sync/max_tensor_mb": self.max_tensor_bytes / 2**20,
            "weight_sync/seconds": self.seconds,
        }


class _Tap:
    """Passes the stream through, counting it and recording checksums when asked."""

    def __init__(self, stream: Iterable[tuple[str, torch.Tensor]], checksum_dtype) -> None:
        self.stream = stream
        self.checksum_dtype = checksum_dtype
        self.sent: list[TensorChecksum] = []
        self.num_tensors = self.total_bytes = self.max_bytes = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.stream:
            nbytes = tensor.numel() * tensor.element_size()
            self.num_tensors += 1
            self.total_bytes += nbytes
            self.max_bytes = max(self.max_bytes, nbytes)
            if self.checksum_dtype is not None:
                self.sent.append(tensor_checksum(name, tensor.to(self.checksum_dtype)))
            yield name, tensor


def stream_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    engine: RolloutEngine,
    *,
    verify: Verify = "checksum",
) -> SyncReport:
    """Load the trainer's weights into ``engine`` in one lazily consumed stream.

    Args:
        named_tensors: (HF name, full tensor) pairs.
        engine: the rollout engine (its weights awake).
        verify: ``checksum`` compares every tensor after the stream; other values skip it
            (``logprobs`` is done by the caller with ``check_logprobs``).

    Raises:
        WeightSyncError: a checksum differs, or the engine left part of the stream unread.
    """
    start = time.perf_counter()
    tap = _Tap(named_tensors, engine.weight_dtype if verify == "checksum" else None)
    stream = iter(tap)
    engine.load_weights(stream)
    left = sum(1 for _ in stream)
    if left:
        raise WeightSyncError(f"weight sync: the rollout engine left {left} tensors unread")
    if verify == "checksum":
        held = {c.name: c for c in engine.checksum([c.name for c in tap.sent])}
        for expected in tap.sent:
            got = held.get(expected.name)
            if got is None or not expected.matches(got):
                raise WeightSyncError(
                    f"weight sync: tensor {expected.name!r}: the rollout engine holds {got} "
                    f"but the trainer sent {expected}"
                )
    seconds = time.perf_counter() - start
    return SyncReport(tap.num_tensors, tap.total_bytes, tap.max_bytes, seconds)


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
