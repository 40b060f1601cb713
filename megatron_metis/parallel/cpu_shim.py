"""The one place where Megatron-Core 0.16+ is taught to run on a CPU (gloo, local layers).

Megatron-Core calls ``torch.cuda.current_device()`` and allocates on ``device="cuda"`` in a few
hard-wired places: RoPE (and its context-parallel slicing), the attention matmul buffer, the
vocab gather, the pipeline schedules, p2p communication, the optimizer's scalars and grad
buffers, and the tied-embedding sync of pipelined models. Each site and why it is patched is
listed in ``shared/research/deps-megatron.md`` section 3 (the CP slicing below, measured later).
The shim is applied only
when the run's device is the CPU, once per process, and is never needed on GPU.
"""

from __future__ import annotations

import importlib
import warnings

import torch

_APPLIED = {"done": False}


_FACTORIES = frozenset({"tensor", "zeros", "ones", "empty", "full", "arange"})
# Modules whose module-level ``torch`` allocates on device="cuda" by name (schedules: the token
# counter; optimizer, grad scaler, clipping: their scalars; grad buffers: a warm-up tensor).
_PROXIED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
    # context parallelism: RoPE keeps this CP rank's positions with an index tensor built as
    # ``torch.tensor(..., device="cpu", pin_memory=True).cuda()`` (get_pos_emb_on_this_cp_rank)
    "megatron.core.models.common.embeddings.rope_utils",
)


class _CpuTorchProxy:
    """Stands in for the ``torch`` global of one Megatron module: tensor factories called with
    ``device="cuda"`` (or ``pin_memory=True``) allocate plain CPU memory; everything else is
    forwarded to torch."""

    def __getattr__(self, name: str):
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args, device=None, pin_memory=False, **kwargs):
            if device is not None and str(device).startswith("cuda"):
                device = "cpu"
            # pinned memory needs an accelerator; on the CPU it is just memory
            return attr(*args, device=device, **kwargs)

        return factory


def _causal_mask(sq: int, skv: int | None = None) -> torch.Tensor:
    """Megatron's default causal mask (True = masked), built on the CPU."""
    skv = sq if skv is None else skv
    return torch.triu(torch.ones(sq, skv, dtype=torch.bool), diagonal=skv - sq + 1)


def apply_cpu_shim() -> None:
    """Patch the CUDA-only call sites of Megatron-Core so it runs on the CPU. Idempotent."""
    if _APPLIED["done"]:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the Megatron CPU shim must not be applied on a machine with CUDA")
    # "Transformer Engine / Apex not installed, falling back" and friends: expected on a CPU.
    warnings.filterwarnings("ignore", module=r"megatron\.core")
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # LanguageModule.setup_embeddings_and_output_layer moves the tied output weight with
    # `.cuda()` before its first-stage/last-stage all-reduce (tied embeddings with PP > 1).
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    transformer_utils.get_default_causal_mask = _causal_mask
    fused_softmax.get_default_causal_mask = _causal_mask
    for name in _PROXIED_MODULES:
        importlib.import_module(name).torch = _CpuTorchProxy()
    _APPLIED["done"] = True
