"""The optimizer of the engine: Megatron's on GPUs, a small exact stand-in on the CPU.

Why two: Megatron-Core's optimizer classes assume CUDA tensors (``clip_grads`` asserts
``torch.cuda.FloatTensor`` gradients and ``DistributedOptimizer`` rejects CPU tensors), so on the
CPU ``CpuOptimizer`` applies ``torch.optim`` Adam(W) / SGD to the parameters, reading the
gradients Megatron's DDP wrapper left in ``param.main_grad`` (already reduced over DP, and over
the tied-embedding and TP groups by ``finalize_model_grads``). Its gradient norm is Megatron's:
squares of every gradient counted once (tensor-parallel duplicates only on TP rank 0, the
tied output-layer copy of the embedding skipped), summed over the model-parallel ranks
(TP x PP), square root; clipping scales all gradients by ``clip_grad / (norm + 1e-6)`` when
the norm exceeds ``clip_grad``. Weight decay follows Megatron's default param groups: none on
biases and 1-D parameters (norm weights). Both optimizers expose the same small interface
(``TrainOptimizer``) and get their learning rate from ``lr_at`` before each step.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_metis.config import OptimizerConfig
from megatron_metis.parallel import ParallelContext


class TrainOptimizer(Protocol):
    """What the training step needs of an optimizer."""

    def zero_grad(self) -> None:
        """Clear the gradients (and the DDP grad buffers)."""
        ...

    def step(self, lr: float) -> tuple[bool, float]:
        """Clip and apply the gradients at learning rate ``lr``; returns (applied, grad norm)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def lr_at(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Linear warm-up to ``cfg.lr`` over ``cfg.warmup_steps`` steps (the first step already uses
    ``lr / warmup_steps``), then ``constant``, ``linear`` or ``cosine`` decay to ``cfg.min_lr``
    at ``total_steps``.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_style == "constant":
        return cfg.lr
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * coeff


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return name.endswith(".bias") or param.dim() == 1


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


class CpuOptimizer:
    """``torch.optim`` Adam(W)/SGD on ``param.main_grad`` with Megatron's grad norm and clipping.

    Args:
        named_params: the model's (name, parameter) pairs; frozen ones are skipped.
        ctx: the parallel layout (grad-norm reduction groups, TP rank for duplicates).
        cfg: the optimizer section.
        zero_grad_buffer: clears the DDP wrapper's grad buffers (``ddp.zero_grad_buffer``).
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        ctx: ParallelContext,
        cfg: OptimizerConfig,
        zero_grad_buffer: Any = None,
    ) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self._zero_grad_buffer = zero_grad_buffer
        trainable = [(n, p) for n, p in named_params if p.requires_grad]
        self.params = [p for _, p in trainable]
        decay = [p for n, p in trainable if not _no_weight_decay(n, p)]
        no_decay = [p for n, p in trainable if _no_weight_decay(n, p)]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if cfg.name == "adam":
            self.inner = torch.optim.AdamW(
                groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
            )
        else:
            self.inner = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)

    def zero_grad(self) -> None:
        if self._zero_grad_buffer is not None:
            self._zero_grad_buffer()
        for p in self.params:
            p.grad = None

    def _counted(self, param: torch.nn.Parameter) -> bool:
        """Megatron's ``param_is_not_shared`` and ``param_is_not_tensor_parallel_duplicate``."""
        if getattr(param, "shared", False):
            return False
        return bool(getattr(param, "tensor_model_parallel", False)) or self.ctx.tp_rank == 0

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients (each counted once over TP x PP)."""
        sq = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            grad = _grad_of(p)
            if grad is not None and self._counted(p):
                sq += grad.detach().double().square().sum().cpu()
        for group, size in ((self.ctx.tp_group, self.ctx.tp), (self.ctx.pp_group, self.ctx.pp)):
            if size > 1:
                dist.all_reduce(sq, group=group)
        return float(sq.sqrt())

    def step(self, lr: float) -> tuple[bool, float]:
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return False, norm
        coeff = self.cfg.clip_grad / (norm + 1e-6) if self.cfg.clip_grad > 0 else 1.0
        for p in self.params:
            grad = _grad_of(p)
            if grad is None:
                p.grad = None
                continue
            grad = grad.to(p.dtype)
            p.grad = grad * coeff if coeff < 1.0 else grad
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        return True, norm

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])


class MegatronOptimizerAdapter:
    """Megatron-Core's optimizer (``get_megatron_optimizer``) behind ``TrainOptimizer``: mixed
    precision, the distributed optimizer when DP > 1, Megatron's own clipping."""

    def __init__(self, ddp_model: torch.nn.Module, cfg: OptimizerConfig, dtype: torch.dtype):
        from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        self.ddp_model = ddp_model
        mcfg = McoreOptimizerConfig(
            optimizer=cfg.name,
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.inner = get_megatron_optimizer(mcfg, [ddp_model])

    def zero_grad(self) -> None:
        self.ddp_model.zero_grad_buffer()
        self.inner.zero_grad()

    def step(self, lr: float) -> tuple[bool, float]:
        for group in self.inner.param_groups:
            group["lr"] = lr
        ok, grad_norm, _ = self.inner.step()
        return bool(ok), float(grad_norm if grad_norm is not None else float("nan"))

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def sharded_state_dict(self, model_sharded_state_dict: dict[str, Any]) -> dict[str, Any]:
        """For dist checkpointing (the distributed optimizer keeps sharded state)."""
        return self.inner.sharded_state_dict(model_sharded_state_dict)
