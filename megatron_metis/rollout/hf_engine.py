"""``RolloutEngine`` on Hugging Face transformers: CPU runs, tests and small GPU runs.

Generation is ``model.generate`` on left-padded batches (temperature / top-p sampling, no
top-k, stop strings, EOS = ``<|im_end|>`` or ``<|endoftext|>``). The log-probs of the sampled
tokens are recomputed afterwards with one forward over prompt + completion (left-padded,
position ids counted from each prompt's first real token), which is exactly what the trainer
computes. Sampling is deterministic given the seed: call k of ``generate`` uses
``seed + k`` (or ``SamplingParams.seed``) inside a forked RNG, so the caller's RNG is left
alone.

Weights: ``load_weights`` accepts the HF release names (``model.layers.*``, ``visual.*``,
``lm_head.weight``; what ``export_hf_weights`` yields) and transformers-5 internal names
(``model.language_model.*``, ``model.visual.*``) for both Qwen2 and Qwen2.5-VL models.

``sleep()`` moves a CUDA model to the CPU and empties the CUDA cache; ``wake()`` moves it
back. On the CPU both only flip a flag (``generate`` refuses to run while asleep).

Legend: B sequences in a batch, L padded length, K kept logit positions, V vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from megatron_metis.config.rl import RolloutConfig
from megatron_metis.rollout.engine import (
    Completion,
    FinishReason,
    RolloutRequest,
    SamplingParams,
    TensorChecksum,
    logprob_temperature,
    tensor_checksum,
)

# Release-file names -> transformers-5 module names of Qwen2.5-VL (transformers' own
# conversion_mapping for Qwen2VLForConditionalGeneration does the same at load time).
_VL_RENAMES = (
    (re.compile(r"^visual\."), "model.visual."),
    (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
)
_TEXT_RENAMES = ((re.compile(r"^model\.language_model\."), "model."),)

_VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


class HFRolloutEngine:
    """Wraps a transformers causal LM (``Qwen2ForCausalLM`` or
    ``Qwen2_5_VLForConditionalGeneration``) and its tokenizer."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        seed: int = 0,
        batch_size: int = 64,
        processor: Any | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.seed = seed
        self.batch_size = batch_size
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self.weight_dtype = next(iter(self._params.values())).dtype
        self._device = next(iter(self._params.values())).device
        self._is_vl = "vl" in str(getattr(model.config, "model_type", ""))
        self._renames = _VL_RENAMES if self._is_vl else _TEXT_RENAMES
        self._calls = 0
        self._asleep = False
        self.needs_weights = False
        eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        self.eos_ids = sorted(i for i in eos if isinstance(i, int) and i >= 0)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

    @classmethod
    def from_pretrained(
        cls, hf_dir: str | Path, cfg: RolloutConfig, *, device: str | torch.device = "cpu"
    ) -> HFRolloutEngine:
        """Build from a HF folder; without safetensors the weights are random (stream them)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(hf_dir)
        dtype = getattr(torch, cfg.dtype)
        if config.model_type == "qwen2_5_vl":
            from transformers import Qwen2_5_VLForConditionalGeneration as model_cls
        else:
            model_cls = AutoModelForCausalLM
        if any(Path(hf_dir).glob("*.safetensors")):
            model = model_cls.from_pretrained(hf_dir, dtype=dtype)
        else:
            model = model_cls.from_config(config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        return cls(model.to(device), tokenizer, seed=cfg.seed, batch_size=cfg.generation_batch_size)

    # ------------------------------------------------------------------ weights

    def _resolve(self, name: str) -> torch.nn.Parameter:
        if name in self._params:
            return self._params[name]
        for pattern, repl in self._renames:
            name2 = pattern.sub(repl, name)
            if name2 in self._params:
                return self._params[name2]
        raise KeyError(f"the rollout model has no weight named {name!r}")

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each (HF name, full tensor) into the model (cast to ``weight_dtype``)."""
        for name, tensor in named_tensors:
            param = self._resolve(name)
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"weight {name!r}: shape {tuple(tensor.shape)} does not match the rollout "
                    f"model's {tuple(param.shape)}"
                )
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))

    def checksum(self, names: Sequence[str]) -> list[TensorChecksum]:
        return [tensor_checksum(name, self._resolve(name)) for name in names]

    # ------------------------------------------------------------------ sleep

    def sleep(self) -> None:
        if self._device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def close(self) -> None:
        """Nothing to release beyond the model, which the garbage collector takes."""

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """The model comes back with ``weights`` (or all); it has no KV cache to allocate."""
        if tags is not None and "weights" not in tags:
            return
        if self._asleep and self._device.type == "cuda":
            self.model.to(self._device)
        self._asleep = False

    # ------------------------------------------------------------------ generation

    def generate(
        self, requests: Sequence[RolloutRequest], params: SamplingParams
    ) -> list[Completion]:
        """Sample ``params.n`` completions per request (request-major order)."""
        if self._asleep:
            raise RuntimeError("the rollout engine is asleep: call wake() first")
        rows = [(i, s) for i in range(len(requests)) for s in range(params.n)]
        seed = params.seed if params.seed is not None else self.seed + self._calls
        self._calls += 1
        out: list[Completion] = []
        devices = [self._device.index or 0] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                out.extend(self._generate_batch(requests, chunk, params))
        return out

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        """Sampling settings; vision placeholder tokens are never generated: a completion is
        text, and an ``<|image_pad|>`` without image features breaks every later forward of
        prompt + completion (a weak policy, like the tiny random model, does sample them)."""
        sample = params.temperature > 0
        return GenerationConfig(
            suppress_tokens=self._vision_token_ids() or None,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=0 if sample else None,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            stop_strings=list(params.stop) or None,
        )

    def _vision_token_ids(self) -> list[int]:
        return [i for i in map(self._token_id, _VISION_TOKENS) if i is not None]

    def _token_id(self, token: str) -> int | None:
        """The id of a special token, None when the tokenizer does not have it."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        ok = isinstance(token_id, int) and token_id >= 0 and token_id != self.tokenizer.unk_token_id
        return token_id if ok else None

    @torch.no_grad()
    def _generate_batch(
        self,
        requests: Sequence[RolloutRequest],
        rows: list[tuple[int, int]],
        params: SamplingParams,
    ) -> list[Completion]:
        reqs = [requests[i] for i, _ in rows]
        prompts = [list(r.prompt_ids) for r in reqs]
        input_ids_BL, mask_BL = self._left_pad(prompts)
        new_BL = self.model.generate(
            input_ids=input_ids_BL,
            attention_mask=mask_BL,
            generation_config=self._generation_config(params),
            tokenizer=self.tokenizer,
            **self._mm_kwargs(reqs, input_ids_BL),
        )[:, input_ids_BL.shape[1] :]
        trimmed = [self._trim(row.tolist(), params) for row in new_BL.cpu()]
        temperature = logprob_temperature(params.temperature)
        logprobs = self._score_batch(prompts, [t for t, _ in trimmed], reqs, temperature)
        return [
            Completion(
                request_index=i,
                sample_index=s,
                token_ids=tokens,
                logprobs=lp.tolist(),
                text=self.tokenizer.decode(tokens),
                finish_reason=reason,
                problem_id=req.problem_id,
            )
            for (i, s), req, (tokens, reason), lp in zip(rows, reqs, trimmed, logprobs, strict=True)
        ]

    def _trim(self, tokens: list[int], params: SamplingParams) -> tuple[list[int], FinishReason]:
        """Cut a generated row at its stop string or EOS (batch padding follows either)."""
        eos_at = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
        body = tokens if eos_at is None else tokens[:eos_at]
        stop_at = self._stop_position(body, params.stop)
        if stop_at is not None:
            return body[:stop_at], "stop"
        if eos_at is not None:
            return tokens[: eos_at + 1], "stop"
        return tokens, "length"

    def _stop_position(self, tokens: list[int], stops: Sequence[str]) -> int | None:
        """Smallest k such that the text of ``tokens[:k]`` contains a stop string."""
        has_stop = lambda k: any(s in self.tokenizer.decode(tokens[:k]) for s in stops)
        if not stops or not tokens or not has_stop(len(tokens)):
            return None
        lo, hi = 1, len(tokens)  # decoded prefixes only grow: binary search
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
        return lo

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(s) for s in seqs)
        ids_BL = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(seqs), length), dtype=torch.long)
        for b, s in enumerate(seqs):
            if s:
                ids_BL[b, length - len(s) :] = torch.tensor(s)
                mask_BL[b, length - len(s) :] = 1
        return ids_BL.to(self._device), mask_BL.to(self._device)

    def _mm_kwargs(
        self, reqs: Sequence[RolloutRequest], input_ids_BL: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Vision inputs of the batch, concatenated in row order (Qwen2.5-VL layout).

        With images, ``mm_token_type_ids`` (1 at image tokens, 2 at video tokens) goes along:
        transformers 5 computes the M-RoPE positions of the image tokens from it, and without
        it silently gives them plain 1-D positions, which the trainer never uses.
        """
        parts: dict[str, list[torch.Tensor]] = {}
        for req in reqs:
            mm = req.mm_inputs
            if mm is None and req.images:
                if self.processor is None:
                    raise ValueError("a request has images but neither mm_inputs nor processor")
                mm = dict(
                    self.processor.image_processor(images=list(req.images), return_tensors="pt")
                )
            for key, value in (mm or {}).items():
                parts.setdefault(key, []).append(value)
        kwargs = {k: torch.cat(v).to(self._device) for k, v in parts.items()}
        if kwargs:
            kwargs["mm_token_type_ids"] = self._mm_token_types(input_ids_BL)
        return kwargs

    def _mm_token_types(self, input_ids_BL: torch.Tensor) -> torch.Tensor:
        types_BL = torch.zeros_like(input_ids_BL, dtype=torch.int)
        for kind, token in ((1, "<|image_pad|>"), (2, "<|video_pad|>")):
            token_id = self._token_id(token)
            if token_id is not None:
                types_BL[input_ids_BL == token_id] = kind
        return types_BL

    # ------------------------------------------------------------------ scoring

    def score(
        self, sequences: Sequence[Sequence[int]], *, temperature: float = 1.0
    ) -> list[torch.Tensor]:
        """Log-probs of tokens 1.. of each (text-only) sequence given the tokens before."""
        if self._asleep:
            raise RuntimeError("the rollout engine is asleep: call wake() first")
        reqs = [RolloutRequest(prompt_ids=s[:1]) for s in sequences]
        out: list[torch.Tensor] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            prompts = [list(s[:1]) for s in sequences[chunk]]
            completions = [list(s[1:]) for s in sequences[chunk]]
            out.extend(self._score_batch(prompts, completions, reqs[chunk], temperature))
        return out

    @torch.no_grad()
    def _score_batch(
        self,
        prompts: list[list[int]],
        completions: list[list[int]],
        reqs: Sequence[RolloutRequest],
        temperature: float,
    ) -> list[torch.Tensor]:
        """One forward over left-padded prompt + completion; fp32 log-probs per completion."""
        ids_BL, mask_BL = self._left_pad([p + c for p, c in zip(prompts, completions, strict=True)])
        keep = max(len(c) for c in completions) + 1
        kwargs: dict[str, Any] = self._mm_kwargs(reqs, ids_BL)
        if not self._is_vl:  # Qwen2.5-VL derives its M-RoPE positions from the mask itself
            kwargs["position_ids"] = (mask_BL.cumsum(-1) - 1).clamp(min=0)
        logits_BKV = self.model(
            input_ids=ids_BL, attention_mask=mask_BL, logits_to_keep=keep, **kwargs
        ).logits
        logp_BKV = torch.log_softmax(logits_BKV.float() / temperature, dim=-1)
        out = []
        for b, comp in enumerate(completions):
            n = len(comp)
            # the last K positions predict the last K - 1 tokens (and one past the end)
            rows_nV = logp_BKV[b, keep - 1 - n : keep - 1]
            target = torch.tensor(comp, dtype=torch.long, device=rows_nV.device)
            out.append(rows_nV.gather(-1, target[:, None]).squeeze(-1).cpu())
        return out
