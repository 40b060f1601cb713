"""``RolloutEngine`` on vLLM (0.32, V1 engine), colocated with the trainer in SPMD style.

The only module that imports vLLM, lazily (inside ``VLLMRolloutEngine.__init__``): importing
this file does not import vLLM, and nothing imports this file except
``rollout.factory.build_rollout_engine`` when ``rollout.backend == "vllm"``.

Layout (as verl / EasyR1 / TRL colocate do): every trainer rank, launched by torchrun or
Slurm, creates one ``vllm.LLM`` with ``distributed_executor_backend="external_launcher"``;
ranks in groups of ``vllm_tensor_parallel_size`` form one vLLM tensor-parallel engine inside
the already initialised ``torch.distributed`` world. The engine core runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so ``LLM.apply_model`` hands the model to a local
function without pickling, and weights are passed as tensors already on this GPU.

Memory choreography per RL step (``enable_sleep_mode=True``)::

    engine.wake(["weights"])        # weights back on the GPU (level 1) or re-allocated (2)
    stream_weights(export_hf_weights(...), engine, ...)   # -> model.load_weights per bucket
    engine.wake(["kv_cache"])       # only now allocate the KV cache: no OOM during the sync
    completions = engine.generate(...)
    engine.sleep()                  # level 1: weights offloaded to CPU; level 2: discarded

Weight check: vLLM holds fused, TP-sharded parameters (``qkv_proj``, ``gate_up_proj``), so the
per-tensor ``checksum`` of HF tensors is not available: use ``rollout.verify_weights=logprobs``
(``score`` + ``weight_sync.check_logprobs``). Log-probs are vLLM's ``processed_logprobs``
(after temperature; after top-p too when ``top_p < 1``, unlike ``HFRolloutEngine``); the
trainer recomputes the old log-probs itself, so these are diagnostics only.

Not covered here: FP8 rollout weights (needs ``process_weights_after_loading`` per bucket),
vLLM pipeline parallelism, LoRA.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_metis.config.rl import RolloutConfig
from megatron_metis.rollout.engine import (
    Completion,
    RolloutRequest,
    SamplingParams,
    TensorChecksum,
)


class VLLMRolloutEngine:
    """A colocated ``vllm.LLM`` behind the ``RolloutEngine`` protocol."""

    def __init__(self, cfg: RolloutConfig, hf_dir: str | Path) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm  # the project's only vLLM import

        self._vllm = vllm
        self.cfg = cfg
        self.weight_dtype: torch.dtype = getattr(torch, cfg.dtype)
        kwargs: dict[str, Any] = dict(
            model=str(hf_dir),
            dtype=cfg.dtype,
            seed=cfg.seed,
            tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            distributed_executor_backend="external_launcher",
            enable_sleep_mode=True,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            # stale prefix blocks would survive a weight update
            enable_prefix_caching=False,
        )
        kwargs.update(cfg.vllm_overrides)
        self.llm = vllm.LLM(**kwargs)

    def _sampling_params(self, params: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop),
            include_stop_str_in_output=True,
            logprobs=0,
            seed=params.seed,
        )

    def generate(
        self, requests: Sequence[RolloutRequest], params: SamplingParams
    ) -> list[Completion]:
        """``len(requests) * params.n`` completions, request-major."""
        prompts = []
        for req in requests:
            prompt: dict[str, Any] = {"prompt_token_ids": list(req.prompt_ids)}
            if req.images:
                prompt["multi_modal_data"] = {"image": list(req.images)}
            prompts.append(prompt)
        outputs = self.llm.generate(prompts, self._sampling_params(params), use_tqdm=False)
        completions = []
        for i, (req, out) in enumerate(zip(requests, outputs, strict=True)):
            for s, sample in enumerate(out.outputs):
                token_ids = list(sample.token_ids)
                logprobs = [
                    float(lp[t].logprob)
                    for lp, t in zip(sample.logprobs or [], token_ids, strict=False)
                ]
                completions.append(
                    Completion(
                        request_index=i,
                        sample_index=s,
                        token_ids=token_ids,
                        logprobs=logprobs,
                        text=sample.text,
                        finish_reason="length" if sample.finish_reason == "length" else "stop",
                        problem_id=req.problem_id,
                    )
                )
        return completions

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hand one bucket of (HF name, full tensor) to the model's own ``load_weights``.

        vLLM's Qwen2 / Qwen2.5-VL loaders accept the HF release names, fuse q/k/v and
        gate/up and take this rank's tensor-parallel slice themselves.
        """
        bucket = [(name, t.to(self.weight_dtype)) for name, t in named_tensors]
        self.llm.apply_model(lambda model: model.load_weights(weights=iter(bucket)))
        self.llm.reset_prefix_cache()

    def checksum(self, names: Sequence[str]) -> list[TensorChecksum]:
        raise NotImplementedError(
            "vLLM holds fused, sharded weights: use rollout.verify_weights=logprobs"
        )

    def score(
        self, sequences: Sequence[Sequence[int]], *, temperature: float = 1.0
    ) -> list[torch.Tensor]:
        """Prompt log-probs of each sequence's tokens 1.. (temperature 1 only: vLLM computes
        prompt log-probs from the raw logits)."""
        if temperature != 1.0:
            raise ValueError("VLLMRolloutEngine.score supports temperature 1.0 only")
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        prompts = [{"prompt_token_ids": list(s)} for s in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            torch.tensor(
                [
                    float(lp[t].logprob)
                    for lp, t in zip(out.prompt_logprobs[1:], seq[1:], strict=True)
                ]
            )
            for out, seq in zip(outputs, sequences, strict=True)
        ]

    def sleep(self) -> None:
        self.llm.sleep(level=self.cfg.vllm_sleep_level)

    def wake(self, tags: list[str] | None = None) -> None:
        """Wake all (``None``) or only ``["weights"]`` / ``["kv_cache"]``."""
        self.llm.wake_up(tags=tags)
