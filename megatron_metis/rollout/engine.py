"""The rollout seam: what the trainer asks of a generation engine, and the types it exchanges.

Implementations: ``HFRolloutEngine`` (transformers; CPU and small GPU runs) and
``VLLMRolloutEngine`` (colocated vLLM, GPU; ``vllm_engine.py`` is the only vLLM importer).
Both receive the policy's weights as a stream of (HF name, full tensor) pairs produced from
the Megatron shards (``checkpoint.hf_convert.export_hf_weights``), through
``weight_sync.stream_weights``.

Log-probabilities: ``Completion.logprobs[i]`` is ``log softmax(logits / T)`` of the i-th
generated token, ``T = logprob_temperature(temperature)``, i.e. what the trainer recomputes;
top-p truncation is not part of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


def logprob_temperature(temperature: float) -> float:
    """The temperature log-probs of sampled tokens are computed at (engine and trainer alike):
    the sampling temperature, or 1 for greedy decoding (temperature 0)."""
    return temperature if temperature > 0 else 1.0


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; ``n`` responses per request (a GRPO group). Built from the config by
    ``rollout.client.sampling_params``."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    stop: tuple[str, ...] = ("</answer>",)
    n: int = 1
    seed: int | None = None
    """Overrides the engine's seed for this call."""


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt.

    Attributes:
        prompt_ids: chat-templated prompt token ids, image placeholders already expanded to
            their ``<|image_pad|>`` count (what the trainer and ``HFRolloutEngine`` take).
        placeholder_prompt_ids: the same prompt with one ``<|image_pad|>`` per image (what
            vLLM takes: it expands them itself); None for a text-only prompt.
        images: decoded images (vLLM preprocesses them itself).
        mm_inputs: preprocessed vision inputs for transformers (``pixel_values``,
            ``image_grid_thw``), as the Qwen2.5-VL processor returns them for this prompt.
        problem_id: carried through to the completions.
    """

    prompt_ids: Sequence[int]
    placeholder_prompt_ids: Sequence[int] | None = None
    images: Sequence[Any] | None = None
    mm_inputs: dict[str, torch.Tensor] | None = None
    problem_id: str = ""


@dataclass
class Completion:
    """One sampled response.

    Attributes:
        request_index: index of its request in the ``generate`` call.
        sample_index: 0..n-1 within the request's group.
        token_ids: generated tokens, the stop string's tokens or the EOS token included.
        logprobs: one per token (see the module docstring).
        text: decoded ``token_ids``.
        finish_reason: ``stop`` (stop string or EOS) or ``length`` (hit ``max_new_tokens``).
    """

    request_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    problem_id: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class TensorChecksum:
    """Cheap fingerprint of a tensor: float64 sum, sum of squares and a position-weighted sum
    (weights 1..7 cycling over the flat index: catches permuted or transposed data)."""

    name: str
    shape: tuple[int, ...]
    total: float
    total_sq: float
    weighted: float
    scale: float
    """sum(|x|): the tolerance of a comparison is relative to it."""

    def matches(self, other: TensorChecksum, *, rtol: float = 1e-7) -> bool:
        if self.shape != other.shape:
            return False
        tol = rtol * max(self.scale, other.scale, 1e-30)
        sq_tol = rtol * max(self.total_sq, other.total_sq, 1e-30)
        return (
            abs(self.total - other.total) <= tol
            and abs(self.weighted - other.weighted) <= 7 * tol
            and abs(self.total_sq - other.total_sq) <= sq_tol
        )


@torch.no_grad()
def tensor_checksum(name: str, tensor: torch.Tensor) -> TensorChecksum:
    """``TensorChecksum`` of ``tensor`` (computed on its device, in float64)."""
    flat = tensor.detach().reshape(-1).to(torch.float64)
    weights = (torch.arange(flat.numel(), device=flat.device) % 7 + 1).to(torch.float64)
    return TensorChecksum(
        name=name,
        shape=tuple(tensor.shape),
        total=float(flat.sum()),
        total_sq=float(flat.square().sum()),
        weighted=float((flat * weights).sum()),
        scale=float(flat.abs().sum()),
    )


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation engine colocated with the trainer.

    Life cycle per RL step (``trainer.rollout_io.RolloutSession``): ``wake(["weights"])`` ->
    ``load_weights`` (the whole stream, when the policy changed or the engine dropped its
    weights) -> ``wake(["kv_cache"])`` -> ``generate`` -> ``sleep()`` (free the accelerator
    for the training step).
    """

    weight_dtype: torch.dtype
    """dtype the engine stores its weights in (streamed tensors are cast to it)."""
    needs_weights: bool
    """True when the engine holds no usable weights (vLLM after a level-2 sleep): the next
    generation must be preceded by a weight stream."""

    def generate(
        self, requests: Sequence[RolloutRequest], params: SamplingParams
    ) -> list[Completion]:
        """``len(requests) * params.n`` completions, request-major (a request's n together)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the whole weight stream, (HF name, full tensor) pairs consumed lazily, in one
        call (vLLM processes each layer once all its tensors have arrived)."""
        ...

    def checksum(self, names: Sequence[str]) -> list[TensorChecksum]:
        """Checksums of the named tensors as the engine now holds them."""
        ...

    def score(
        self, sequences: Sequence[Sequence[int]], *, temperature: float = 1.0
    ) -> list[torch.Tensor]:
        """Log-probs ``[len - 1]`` of each sequence's tokens 1.. given the tokens before."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory until ``wake``."""
        ...

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Re-acquire what ``sleep`` released: all (None), or ``["weights"]`` (before a
        stream) / ``["kv_cache"]`` (after it)."""
        ...

    def close(self) -> None:
        """Release the engine for good (vLLM: its process groups too)."""
        ...
