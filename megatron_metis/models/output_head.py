"""A ``GPTModel`` whose last stage hands its final hidden states to the loss instead of logits.

With ``train.logprob_impl=fused`` the trainer computes log-probs with the fused kernel
(``megatron_metis.kernels.fused_logprob``) straight from the final hidden states and the
output weight shard, so the ``[B, S, V/tp]`` logits never exist. The model is then built as a
``HiddenStateGPTModel`` (``build_model(..., returns_hidden_states=True)``): a ``GPTModel`` in
every other respect, with the same ``output_layer`` (Megatron's ``ColumnParallelLinear``) and
its ``weight`` parameter (or none, when the embeddings are tied on the first stage), the same
state-dict names, so checkpoints, weight export and conversion are unaffected. Only the last
step of its forward differs: where ``GPTModel._postprocess`` runs the output layer, it returns
the layer's input.

What it keeps of the output layer's forward: with sequence parallelism, the all-gather of its
input over the sequence (``gather_from_sequence_parallel_region``, whose backward
reduce-scatters, i.e. sums the TP ranks' partial gradients), so the returned hidden states are
the full ``[S, B, H]`` the GEMM would have consumed, replicated over TP; and the ``[S, B, X]``
to ``[B, S, X]`` transpose of ``GPTModel._postprocess``, so the loss function receives
``hidden_BSH`` where it would have received ``logits_BSv``.

The TP reduction of the hidden-state gradient. Each TP rank's kernel backward yields only its
vocabulary shard's partial sum of it; someone must all-reduce it over TP (Megatron's linear
does it inside its backward, ``allreduce_dgrad``). With sequence parallelism the reduce-scatter
above does; without, the *kernel* must (``reduce_grad_hidden=True``), not a
``copy_to_tensor_model_parallel_region`` here: the gradient arriving here is the transpose of
the ``[B, S, H]`` one, non-contiguous for B > 1, and Megatron's ``_reduce`` all-reduces
``input_.contiguous()``, a temporary, then returns the unreduced input; the reduction silently
vanishes (the TP=2 gradient test of ``tests/unit/trainer/test_fused_loss.py`` caught it).
:func:`kernel_reduces_grad_hidden` tells the caller which case applies.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel

from megatron_metis.models.forward import unwrap


class HiddenStateGPTModel(GPTModel):
    """``GPTModel`` whose last stage returns its final hidden states ``[B, S, H]`` (after the
    final norm, TP-replicated), not logits. Takes ``GPTModel``'s constructor arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.mtp_num_layers:
            raise ValueError(
                "multi-token prediction computes its loss from the output layer's logits"
            )

    def _postprocess(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        """``[S(/tp), B, H]`` decoder output -> ``[B, S, H]`` on the last stage; the other
        stages pass it on as ``GPTModel`` does."""
        if not self.post_process:
            return super()._postprocess(hidden_states, *args, **kwargs)
        if kwargs.get("labels") is not None:
            raise ValueError("this model returns hidden states; the loss is computed outside it")
        if self.output_layer.sequence_parallel:
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=self.output_layer.tp_group
            )
        return hidden_states.transpose(0, 1).contiguous()


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` of an engine model: unwraps DDP (``.module``) and Qwen2.5-VL
    (``.language_model``)."""
    model = unwrap(model)
    return getattr(model, "language_model", model)


def returns_hidden_states(model: torch.nn.Module) -> bool:
    """True when ``model`` (GPTModel, Qwen2_5_VLModel, or a DDP wrapper of one) was built with
    the hidden-state head: its last stage returns hidden states, not logits."""
    return isinstance(decoder_of(model), HiddenStateGPTModel)


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
