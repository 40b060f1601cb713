"""Qwen2.5-VL on the engine: the Hugging Face vision tower + the Megatron-Core Qwen2 decoder.

Why the vision tower is the Hugging Face module (``Qwen2_5_VisionTransformerPretrainedModel``)
and not a Megatron implementation:

- Megatron-Core's Qwen2.5-VL vision model is built from Transformer Engine layers and always
  passes ``packed_seq_params`` (cu_seqlens for the window / full attention); Megatron's local
  attention rejects packed sequences, so it cannot run on a CPU at all
  (``shared/research/deps-megatron.md`` section 5). The HF module runs on CPU and GPU.
- It is ~0.7B parameters of a 7B/72B model and its activations are small next to the decoder's,
  so tensor-parallelising it buys little; peers (verl, slime, NeMo RL's DTensor path) replicate it.
- It *is* the reference: window attention, 2-D rotary and the patch merger are exactly
  transformers' code, and checkpoints keep the HF names (``visual.*``) one to one.

Parallel layout: the tower lives on the first pipeline stage only and is replicated on every TP
rank. Each TP rank runs the same tower on the same pixels, and the gradient that reaches the
image features is the full one on every TP rank (the decoder's first column-parallel linear
all-reduces its input gradient in backward), so the tower's gradients are identical across TP
ranks and need no TP reduction; data-parallel reduction treats them like any other parameter.
Under context parallelism every CP rank embeds the whole sequence (an image's features land by
their place in it) and keeps its own positions; each rank's tower gradient then comes from its
positions only, and the DP x CP gradient reduction sums them.

Shape legend: ``B`` batch, ``S`` sequence, ``H`` hidden, ``N`` image tokens after the merge,
``P`` patches (rows of ``pixel_values``), ``C`` values per patch, ``V`` vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_metis.config import ConfigError, ModelConfig
from megatron_metis.models.rope_index import image_token_counts, mrope_position_ids
from megatron_metis.parallel.context_parallel import shard_sequence

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class VisionTokens:
    """The ids and numbers the decoder needs to place image features."""

    image_token_id: int
    spatial_merge_size: int


def vision_tokens_of(hf_config: dict) -> VisionTokens:
    """Read ``image_token_id`` and the patch merge size from a Qwen2.5-VL ``config.json``."""
    vision = hf_config.get("vision_config") or {}
    text = hf_config.get("text_config") or {}
    token = hf_config.get("image_token_id", text.get("image_token_id"))
    return VisionTokens(
        image_token_id=int(151655 if token is None else token),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
    )


def build_vision_tower(hf_config: dict, cfg: ModelConfig) -> torch.nn.Module:
    """The HF Qwen2.5-VL vision tower (randomly initialised), frozen as ``cfg`` says.

    ``model.freeze_vision_tower`` freezes the patch embedding and the ViT blocks,
    ``model.freeze_merger`` the patch merger (the projection into the decoder's width).
    """
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    config = Qwen2_5_VLConfig.from_dict(dict(hf_config)).vision_config
    # sdpa runs on CPU and GPU and is what transformers picks by default (parity).
    config._attn_implementation = "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=_DTYPES[cfg.dtype])
    for name, param in tower.named_parameters():
        frozen = cfg.freeze_merger if name.startswith("merger.") else cfg.freeze_vision_tower
        param.requires_grad_(not frozen)
    return tower


class Qwen2_5_VLModel(MegatronModule):
    """One rank's part of Qwen2.5-VL: ``vision`` (first PP stage only) and ``language_model``.

    ``forward`` takes the same arguments as ``GPTModel.forward`` (``position_ids`` are M-RoPE's
    [3, B, S]) plus the HF image inputs; on the first stage the image features replace the
    embeddings of the ``<|image_pad|>`` tokens. Samples without images can share a batch with
    samples that have them: ``pixel_values`` / ``image_grid_thw`` hold the images of the whole
    batch in sample order, as the HF processor returns them.

    Under context parallelism ``input_ids`` is the whole sequence (the model keeps its CP
    positions after embedding), unlike ``GPTModel``, which takes this rank's positions.
    """

    embeds_full_sequence = True
    """``models.forward.run_pipeline``: give this model the unsharded ``input_ids``."""

    def __init__(
        self, language_model: torch.nn.Module, vision: torch.nn.Module | None, tokens: VisionTokens
    ) -> None:
        super().__init__(config=language_model.config)
        self.language_model = language_model
        self.vision = vision
        self.tokens = tokens
        self.model_type = language_model.model_type
        self.vocab_size = language_model.vocab_size
        self.cp_group = None
        if self.config.context_parallel_size > 1:
            from megatron.core import parallel_state

            pg = getattr(language_model, "pg_collection", None)
            self.cp_group = getattr(pg, "cp", None)
            if self.cp_group is None:
                self.cp_group = parallel_state.get_context_parallel_group()

    # The decoder's stage and embedding attributes, where Megatron's tied-embedding gradient
    # all-reduce (``finalize_model_grads``, PP > 1) looks for them: on the model it is given.
    @property
    def pre_process(self) -> bool:
        return self.language_model.pre_process

    @property
    def post_process(self) -> bool:
        return self.language_model.post_process

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The decoder's word embedding (first stage) or output weight (last stage)."""
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's activations in here."""
        self.language_model.set_input_tensor(input_tensor)

    def position_ids(
        self,
        input_ids_BS: torch.Tensor,
        image_grid_thw_N3: torch.Tensor | None,
        attention_mask_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M-RoPE position ids [3, B, S] of a batch (see ``rope_index.mrope_position_ids``)."""
        positions_3BS, _ = mrope_position_ids(
            input_ids_BS,
            image_grid_thw_N3,
            image_token_id=self.tokens.image_token_id,
            spatial_merge_size=self.tokens.spatial_merge_size,
            attention_mask_BS=attention_mask_BS,
        )
        return positions_3BS

    def embed(
        self,
        input_ids_BS: torch.Tensor,
        pixel_values_PC: torch.Tensor | None,
        image_grid_thw_N3: torch.Tensor | None,
    ) -> torch.Tensor:
        """First stage: token embeddings with image features scattered in -> [S, B, H]."""
        words_BSH = self.language_model.embedding.word_embeddings(input_ids_BS)
        if pixel_values_PC is not None and pixel_values_PC.numel():
            feats_NH = self.image_features(pixel_values_PC, image_grid_thw_N3)
            mask_BS = input_ids_BS == self.tokens.image_token_id
            if int(mask_BS.sum()) != feats_NH.shape[0]:
                raise ValueError(
                    f"{int(mask_BS.sum())} image pad tokens but {feats_NH.shape[0]} image "
                    "features: the token ids and image_grid_thw do not belong together"
                )
            feats_NH = feats_NH.to(words_BSH.dtype)
            words_BSH = words_BSH.masked_scatter(mask_BS.unsqueeze(-1), feats_NH)
        # The embedding module's dropout is skipped: the engine trains with hidden_dropout=0.
        embeds_SBH = words_BSH.transpose(0, 1).contiguous()
        # Context parallelism: image features land by their place in the whole sequence, so
        # the full sequence is embedded and each CP rank keeps its positions.
        embeds_SBH = shard_sequence(embeds_SBH, 0, self.cp_group)
        if self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            embeds_SBH = tensor_parallel.scatter_to_sequence_parallel_region(embeds_SBH)
        return embeds_SBH

    def image_features(
        self, pixel_values_PC: torch.Tensor, image_grid_thw_N3: torch.Tensor
    ) -> torch.Tensor:
        """Vision tower + merger: patches [P, C] -> image tokens [N, H] (all images, in order)."""
        if self.vision is None:
            raise RuntimeError("image features are computed on the first pipeline stage only")
        pixels = pixel_values_PC.to(dtype=next(self.vision.parameters()).dtype)
        trainable = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return self.vision(pixels, grid_thw=image_grid_thw_N3).pooler_output

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V/tp] on the last stage (per-token loss with ``labels``), else hidden."""
        decoder_input = None
        if self.language_model.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw)
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
        )


def build_qwen2_5_vl_model(
    hf_config: dict, arch, ctx, cfg: ModelConfig, *, returns_hidden_states: bool = False
) -> Qwen2_5_VLModel:
    """This rank's part of Qwen2.5-VL: decoder shard (TP, PP stage) + tower on the first stage.

    ``returns_hidden_states``: the decoder's last stage returns hidden states, not logits
    (``qwen2.build_qwen2_model``)."""
    from megatron_metis.models.qwen2 import build_qwen2_model

    if not arch.mrope_section:
        raise ConfigError("a Qwen2.5-VL config.json needs rope_parameters.mrope_section")
    language_model = build_qwen2_model(arch, ctx, cfg, returns_hidden_states=returns_hidden_states)
    vision = build_vision_tower(hf_config, cfg).to(ctx.device) if ctx.is_first_stage else None
    return Qwen2_5_VLModel(language_model, vision, vision_tokens_of(hf_config))


def padding_attention_mask(attention_mask_BS: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean mask [B, 1, S, S] (True = masked): causal and no padded keys."""
    s = attention_mask_BS.shape[1]
    causal_SS = torch.triu(
        torch.ones(s, s, dtype=torch.bool, device=attention_mask_BS.device), diagonal=1
    )
    pad_keys_B11S = ~attention_mask_BS.bool()[:, None, None, :]
    return causal_SS[None, None] | pad_keys_B11S


def split_images_by_sample(
    input_ids_BS: torch.Tensor,
    image_grid_thw_N3: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> list[int]:
    """Number of images of each sample (images are listed in sample order)."""
    if image_grid_thw_N3 is None:
        return [0] * input_ids_BS.shape[0]
    counts = image_token_counts(image_grid_thw_N3, spatial_merge_size)
    per_sample, start = [], 0
    for need in (input_ids_BS == image_token_id).sum(-1).tolist():
        n = 0
        while need > 0 and start + n < len(counts):
            need -= counts[start + n]
            n += 1
        if need:
            raise ValueError("a sample's image pad tokens do not match the image grids")
        per_sample.append(n)
        start += n
    return per_sample


def vl_model_inputs(
    model: Qwen2_5_VLModel,
    input_ids_BS: torch.Tensor,
    *,
    attention_mask_BS: torch.Tensor | None = None,
    pixel_values_PC: torch.Tensor | None = None,
    image_grid_thw_N3: torch.Tensor | None = None,
    num_microbatches: int = 1,
) -> list[dict[str, torch.Tensor | None]]:
    """Split a HF-style batch into the ``forward`` keyword arguments of each microbatch.

    Computes the M-RoPE positions and the padding mask once for the whole batch, then gives each
    microbatch its rows and the patches of its samples' images.
    """
    b = input_ids_BS.shape[0]
    if b % num_microbatches:
        raise ValueError(f"a batch of {b} cannot be split into {num_microbatches} microbatches")
    positions_3BS = model.position_ids(input_ids_BS, image_grid_thw_N3, attention_mask_BS)
    mask_B1SS = None if attention_mask_BS is None else padding_attention_mask(attention_mask_BS)
    images_per_sample = split_images_by_sample(
        input_ids_BS,
        image_grid_thw_N3,
        image_token_id=model.tokens.image_token_id,
        spatial_merge_size=model.tokens.spatial_merge_size,
    )
    patches = [] if image_grid_thw_N3 is None else image_grid_thw_N3.prod(-1).tolist()
    mb = b // num_microbatches
    out, image0, patch0 = [], 0, 0
    for start in range(0, b, mb):
        rows = slice(start, start + mb)
        n_images = sum(images_per_sample[rows])
        n_patches = sum(patches[image0 : image0 + n_images])
        has_images = n_images > 0
        out.append(
            {
                "input_ids": input_ids_BS[rows],
                "position_ids": positions_3BS[:, rows],
                "attention_mask": None if mask_B1SS is None else mask_B1SS[rows],
                "pixel_values": pixel_values_PC[patch0 : patch0 + n_patches]
                if has_images
                else None,
                "image_grid_thw": image_grid_thw_N3[image0 : image0 + n_images]
                if has_images
                else None,
            }
        )
        image0, patch0 = image0 + n_images, patch0 + n_patches
    return out
