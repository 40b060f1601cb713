"""``TrainState``: everything of a run that changes step by step (and is checkpointed).

The model and optimizer are saved by ``checkpointing``; this holds the rest: the phase, the
step, the data position and the per-process RNG states, so that a resumed run takes exactly
the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch


@dataclass
class DataCursor:
    """Position in an epoch-shuffled dataset: the order of epoch ``e`` is a permutation seeded
    by ``(seed, e)``, so the cursor is just (epoch, index)."""

    num_items: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    index: int = 0

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        """The next ``n`` item indices, continuing into the next epoch(s) when needed."""
        out: list[int] = []
        while len(out) < n:
            order = self.order(self.epoch)
            grab = order[self.index : self.index + n - len(out)]
            out.extend(grab)
            self.index += len(grab)
            if self.index >= self.num_items:
                self.epoch, self.index = self.epoch + 1, 0
        return out


@dataclass
class TrainState:
    """The mutable state of one phase of a run."""

    phase: Literal["sft", "rl"]
    step: int = 0
    """Optimizer steps (SFT) or rollout steps (RL) completed."""
    consumed_samples: int = 0
    cursor: DataCursor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrainState:
        cursor = raw.get("cursor")
        return cls(
            phase=raw["phase"],
            step=int(raw["step"]),
            consumed_samples=int(raw.get("consumed_samples", 0)),
            cursor=DataCursor(**cursor) if cursor else None,
            extra=dict(raw.get("extra", {})),
        )


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
