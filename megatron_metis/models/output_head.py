"""An output layer that hands the last stage's hidden states to the loss instead of logits.

With ``train.logprob_impl=fused`` the trainer computes log-probs with the fused kernel
(``megatron_metis.kernels.fused_logprob``) straight from the final hidden states and the
output weight shard, so the ``[B, S, V/tp]`` logits never exist. ``install_hidden_state_head``
turns the decoder's ``output_layer`` (Megatron's ``ColumnParallelLinear``) into a
``HiddenStateOutputLayer`` in place: the same object, the same ``weight`` parameter (or none,
when the embeddings are tied on the first stage), the same state-dict names, so checkpoints,
weight export and conversion are unaffected; only its ``forward`` changes.

What the forward keeps of ``ColumnParallelLinear``: with sequence parallelism, the all-gather
of its input over the sequence (``gather_from_sequence_parallel_region``, whose backward
reduce-scatters, i.e. sums the TP ranks' partial gradients), so the returned hidden states are
the full ``[S, B, H]`` the GEMM would have consumed, replicated over TP.

The TP reduction of the hidden-state gradient. Each TP rank's kernel backward yields only its
vocabulary shard's partial sum of it; someone must all-reduce it over TP (Megatron's linear
does it inside its backward, ``allreduce_dgrad``). With sequence parallelism the reduce-scatter
above does; without, the *kernel* must (``reduce_grad_hidden=True``), not a
``copy_to_tensor_model_parallel_region`` here: the gradient arriving at this layer is the
transpose of the ``[B, S, H]`` one, non-contiguous for B > 1, and Megatron's ``_reduce``
all-reduces ``input_.contiguous()``, a temporary, then returns the unreduced input; the
reduction silently vanishes (the TP=2 gradient test of ``tests/unit/trainer/test_fused_loss.py``
caught it). :func:`kernel_reduces_grad_hidden` tells the caller which case applies.

``GPTModel._postprocess`` transposes the output layer's ``[S, B, X]`` result to ``[B, S, X]``,
so the loss function receives ``hidden_BSH`` where it would have received ``logits_BSv``.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear

from megatron_metis.models.forward import unwrap


class HiddenStateOutputLayer(ColumnParallelLinear):
    """``ColumnParallelLinear`` whose forward returns its (TP-replicated) input, not logits."""

    def forward(  # type: ignore[override]
        self,
        input_: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, None]:
        """``[S(/tp), B, H]`` hidden states -> ``([S, B, H], None)``; ``weight`` is unused
        (the loss takes it from :func:`output_weight`)."""
        del weight, runtime_gather_output
        if self.sequence_parallel:
            input_ = tensor_parallel.gather_from_sequence_parallel_region(
                input_, tensor_parallel_output_grad=True, group=self.tp_group
            )
        return input_, None


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` of an engine model: unwraps DDP (``.module``) and Qwen2.5-VL
    (``.language_model``)."""
    model = unwrap(model)
    return getattr(model, "language_model", model)


def install_hidden_state_head(model: torch.nn.Module) -> None:
    """Make ``model`` (GPTModel, Qwen2_5_VLModel, or a DDP wrapper of one) return hidden states
    ``[B, S, H]`` on the last pipeline stage. Idempotent; a no-op on the other stages."""
    decoder = decoder_of(model)
    if not decoder.post_process:
        return
    layer = decoder.output_layer
    if isinstance(layer, HiddenStateOutputLayer):
        return
    if type(layer) is not ColumnParallelLinear:
        raise TypeError(f"expected Megatron's ColumnParallelLinear, got {type(layer).__name__}")
    if layer.bias is not None:
        raise ValueError("the output layer has a bias; the fused log-prob kernel takes none")
    if getattr(decoder.config, "mtp_num_layers", None):
        raise ValueError("multi-token prediction computes its loss from the output layer's logits")
    layer.__class__ = HiddenStateOutputLayer


def returns_hidden_states(model: torch.nn.Module) -> bool:
    """True when ``model``'s last stage returns hidden states (``install_hidden_state_head``)."""
    decoder = decoder_of(model)
    return bool(decoder.post_process) and isinstance(decoder.output_layer, HiddenStateOutputLayer)


def kernel_reduces_grad_hidden(model: torch.nn.Module) -> bool:
    """The ``reduce_grad_hidden`` argument of the fused kernel for ``model``'s hidden states:
    False under sequence parallelism (the head's gather reduce-scatters the gradient), True
    otherwise (nothing else sums the TP ranks' partial gradients)."""
    return not decoder_of(model).output_layer.sequence_parallel


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """This rank's ``[V_pad/tp, H]`` shard of the output weight, the parameter itself (so its
    gradient reaches DDP's hooks): the shared embedding when tied, else ``output_layer.weight``.
    Last pipeline stage only."""
    decoder = decoder_of(model)
    if not decoder.post_process:
        raise ValueError("the output weight lives on the last pipeline stage")
    if decoder.share_embeddings_and_output_weights:
        return decoder.shared_embedding_or_output_weight()
    return decoder.output_layer.weight
