"""The training engine shared by SFT and RL: model + DDP + optimizer + one step.

``TrainEngine.train_step`` runs all micro-batches of one optimizer step through Megatron's
pipeline schedule (any TP/PP), lets Megatron's DDP wrapper reduce the gradients over the
data-parallel ranks (and the tied-embedding copies over the first and last stages), then clips
and applies them. Losses are normalised by *global* counts (all micro-batches and DP ranks)
that the caller computes with ``parallel.global_count``; DDP averages gradients over DP, so
the step multiplies each loss by the DP size: the result is exactly the gradient of the
globally normalised loss, whatever the split over micro-batches and ranks.

With ``train.logprob_impl=fused`` the model is built so that its last stage returns its hidden
states instead of logits (``setup.build_policy_model``, ``models.output_head``) and
``logprobs`` computes them with the fused kernel: a loss function receives ``hidden_BSH`` where
it would receive ``logits_BSv`` and passes it on to ``logprobs`` unchanged, so loss functions
work the same in both modes.

Legend: B rows, S positions, v local vocabulary columns, H hidden size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_metis.config import MetisConfig
from megatron_metis.models.arch import Qwen2Arch
from megatron_metis.models.forward import Microbatch, run_pipeline
from megatron_metis.models.output_head import (
    kernel_reduces_grad_hidden,
    output_weight,
    returns_hidden_states,
)
from megatron_metis.parallel import ParallelContext
from megatron_metis.trainer.batching import PositionFn
from megatron_metis.trainer.logprobs import (
    VocabShard,
    fused_vocab_parallel_logprobs,
    vocab_parallel_logprobs,
)
from megatron_metis.trainer.optimizer import (
    CpuOptimizer,
    MegatronOptimizerAdapter,
    TrainOptimizer,
    lr_at,
)

LossFn = Callable[[torch.Tensor, Mapping[str, Any]], tuple[torch.Tensor, dict[str, Any]]]


@dataclass
class StepOutput:
    """What one optimizer step reports (loss metrics only on the last pipeline stage)."""

    microbatch_metrics: list[dict[str, Any]]
    grad_norm: float
    lr: float
    applied: bool


class TrainEngine:
    """The policy being trained, wrapped for DP, with its optimizer.

    Attributes:
        module: the bare model (``GPTModel`` or ``Qwen2_5_VLModel``): checkpoints, export. Its
            output must be the one ``train.logprob_impl`` asks for: hidden states (built with
            ``returns_hidden_states=True``) under ``fused``, logits otherwise.
        ddp: the same model inside Megatron's ``DistributedDataParallel``: forward/backward.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        arch: Qwen2Arch,
        ctx: ParallelContext,
        cfg: MetisConfig,
        *,
        total_steps: int,
    ) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        fused = cfg.train.logprob_impl == "fused"
        if returns_hidden_states(module) != fused:
            raise ValueError(
                f"train.logprob_impl={cfg.train.logprob_impl} needs a model built with "
                f"returns_hidden_states={fused} (trainer.setup.build_policy_model)"
            )
        self.module, self.arch, self.ctx, self.cfg = module, arch, ctx, cfg
        self.total_steps = total_steps
        use_dist_opt = (
            cfg.optimizer.use_distributed_optimizer and ctx.dp > 1 and ctx.device.type == "cuda"
        )
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_dist_opt,
        )
        self.ddp = DistributedDataParallel(
            config=module.config, ddp_config=ddp_config, module=module
        )
        module.config.no_sync_func = self.ddp.no_sync
        module.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer: TrainOptimizer
        if ctx.device.type == "cuda":
            dtype = next(module.parameters()).dtype
            opt_cfg = dataclasses.replace(cfg.optimizer, use_distributed_optimizer=use_dist_opt)
            self.optimizer = MegatronOptimizerAdapter(self.ddp, opt_cfg, dtype)
        else:
            self.optimizer = CpuOptimizer(
                list(module.named_parameters()), ctx, cfg.optimizer, self.ddp.zero_grad_buffer
            )
        vocab_per_rank = module.vocab_size // ctx.tp
        self.vocab_shard = VocabShard(
            start=ctx.tp_rank * vocab_per_rank,
            vocab_size=arch.vocab_size,
            group=ctx.tp_group if ctx.tp > 1 else None,
        )

    @property
    def row_multiple(self) -> int:
        """Rows are padded to a multiple of this: 8, and of ``2 * cp`` (context parallelism
        cuts a row into ``2 * cp`` equal chunks)."""
        return math.lcm(8, 2 * self.ctx.cp)

    @property
    def position_fn(self) -> PositionFn | None:
        """M-RoPE positions for Qwen2.5-VL, None for a text model."""
        if not hasattr(self.module, "position_ids"):
            return None
        return lambda ids, grid: self.module.position_ids(ids, grid)

    def logprobs(
        self,
        output_BSx: torch.Tensor,
        labels_BS: torch.Tensor,
        *,
        temperature: float = 1.0,
        model: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) ``[B, S]`` of the labels, chunked and vocab-parallel.

        Args:
            output_BSx: what ``model``'s last stage returned: logits ``[B, S, v]``, or hidden
                states ``[B, S, H]`` when it has the hidden-state head (then the fused kernel
                runs with ``model``'s output weight shard).
            model: the model that produced ``output_BSx`` (default: the policy).
        """
        model = self.module if model is None else model
        chunk = self.cfg.train.logprob_chunk_tokens
        labels_BS = labels_BS.clamp(min=0)
        if returns_hidden_states(model):
            return fused_vocab_parallel_logprobs(
                output_BSx,
                output_weight(model),
                labels_BS,
                self.vocab_shard,
                temperature=temperature,
                reduce_grad_hidden=kernel_reduces_grad_hidden(model),
                chunk_tokens=chunk,
                impl=self.cfg.train.fused_kernel,
            )
        return vocab_parallel_logprobs(
            output_BSx, labels_BS, self.vocab_shard, temperature=temperature, chunk_tokens=chunk
        )

    def train_step(
        self, microbatches: Sequence[Microbatch], loss_fn: LossFn, step: int
    ) -> StepOutput:
        """Forward/backward of all micro-batches, DP reduction, clip, optimizer update.

        ``loss_fn`` returns losses normalised by global counts; they are scaled by the DP size
        here to cancel DDP's gradient averaging.
        """
        scale = float(self.ctx.dp * self.ctx.cp)
        self.ddp.train()
        self.optimizer.zero_grad()

        def scaled(logits: torch.Tensor, inputs: Mapping[str, Any]):
            loss, metrics = loss_fn(logits, inputs)
            return loss * scale, metrics

        metrics = run_pipeline(self.ddp, self.ctx, microbatches, scaled, forward_only=False)
        lr = lr_at(step, self.cfg.optimizer, self.total_steps)
        applied, grad_norm = self.optimizer.step(lr)
        return StepOutput(list(metrics), grad_norm, lr, applied)

    @torch.no_grad()
    def forward_only(self, microbatches: Sequence[Microbatch], fn: LossFn) -> list[Any]:
        """``fn(output, loss_inputs)`` of every micro-batch (last stage; [] elsewhere); the
        output is logits or hidden states, as ``logprobs`` takes it."""
        self.ddp.eval()
        return run_pipeline(self.ddp, self.ctx, microbatches, fn, forward_only=True)
