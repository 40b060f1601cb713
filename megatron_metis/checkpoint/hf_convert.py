"""Hugging Face checkpoint <-> the TP/PP shards of the engine's language model.

``load_hf_weights`` reads on each rank only the slices of the tensors its shard needs.
``export_hf_weights`` is a collective generator over all ranks: it yields (HF name, full tensor)
pairs, one tensor at a time (Qwen2.5-VL: the language model, then the vision tower as
``visual.*``), gathered over TP and broadcast over PP, so every rank (the checkpoint
writer, or a colocated rollout engine) sees the whole model without ever holding all of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_metis.checkpoint.hf_io import (
    AtomicDir,
    CheckpointError,
    HFCheckpointReader,
    copy_side_files,
    write_safetensors_shards,
)
from megatron_metis.checkpoint.layouts import ShardSpec
from megatron_metis.checkpoint.qwen2_5_vl_weights import (
    VISION_HF_PREFIX,
    is_vision_language,
    language_model_of,
    load_vision_weights,
    vision_state,
)
from megatron_metis.checkpoint.qwen2_weights import (
    TIED_OUTPUT_RULE,
    WeightRule,
    detect_hf_prefix,
    language_model_rules,
)
from megatron_metis.models.arch import Qwen2Arch
from megatron_metis.parallel import ParallelContext


def shard_spec(arch: Qwen2Arch, ctx: ParallelContext, padded_vocab_size: int) -> ShardSpec:
    return ShardSpec(
        tp=ctx.tp,
        tp_rank=ctx.tp_rank,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        vocab_size=arch.vocab_size,
        padded_vocab_size=padded_vocab_size,
    )


def global_layer_index(model: torch.nn.Module) -> dict[int, int]:
    """Local decoder layer position on this PP stage -> global layer index."""
    layers = model.decoder.layers
    return {j: int(layer.layer_number) - 1 for j, layer in enumerate(layers)}


def _local_name(rule: WeightRule, layer: int | None, state: dict, local_of: dict[int, int]):
    """State-dict name of (rule, global layer) on this rank; None if another stage owns it."""
    if layer is not None:
        if layer not in local_of:
            return None
        layer = local_of[layer]
    for name in rule.mcore_names(layer):
        if name in state:
            return name
    return None


def load_hf_weights(
    model: torch.nn.Module, ctx: ParallelContext, arch: Qwen2Arch, hf_dir: str | Path
) -> None:
    """Fill this rank's shard of ``model`` from the HF checkpoint in ``hf_dir``.

    For Qwen2.5-VL the first stage also loads the vision tower (``visual.*``).

    Raises:
        CheckpointError: a file is missing or corrupt, a tensor is missing, or its shape does
            not match the model; the message names the tensor.
    """
    reader = HFCheckpointReader(hf_dir)
    if is_vision_language(model) and model.vision is not None:
        load_vision_weights(model.vision, reader)
    model = language_model_of(model)
    prefix = detect_hf_prefix(reader.names())
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if "_extra_state" not in k}
    local_of = {g: j for j, g in global_layer_index(model).items()}
    spec = shard_spec(arch, ctx, model.vocab_size)
    loaded: set[str] = set()
    for rule, layer in language_model_rules(arch):
        name = _local_name(rule, layer, state, local_of)
        if name is None:
            continue
        hf_names = rule.hf_names(prefix, layer)
        for hf_name, expected in zip(hf_names, rule.hf_shapes(arch), strict=True):
            found = reader.shape(hf_name)
            if found != expected:
                raise CheckpointError(
                    f"{hf_dir}: tensor {hf_name!r} has shape {list(found)}, the model config "
                    f"expects {list(expected)}"
                )
        shard = rule.layout.load(reader, hf_names, spec)
        param = state[name]
        if shard.shape != param.shape:
            raise CheckpointError(
                f"{hf_dir}: {hf_names} give a shard of shape {list(shard.shape)} for {name!r}, "
                f"whose shape is {list(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(shard.to(dtype=param.dtype, device=param.device))
        loaded.add(name)
    missing = sorted(set(state) - loaded)
    if missing:
        raise CheckpointError(f"no HF tensor maps to model tensors {missing}")


def _owner_stages(model: torch.nn.Module, ctx: ParallelContext) -> dict[int, int]:
    """Global layer -> pipeline stage that holds it (gathered once over the PP group)."""
    mine = sorted(global_layer_index(model).values())
    if ctx.pp == 1:
        return {layer: 0 for layer in mine}
    per_stage: list[list[int]] = [[] for _ in range(ctx.pp)]
    dist.all_gather_object(per_stage, mine, group=ctx.pp_group)
    return {layer: stage for stage, layers in enumerate(per_stage) for layer in layers}


def _gather_full(rule: WeightRule, shard: torch.Tensor, ctx: ParallelContext, spec: ShardSpec):
    """TP shards of one Megatron tensor -> the full HF tensors it is made of."""
    layout = rule.layout
    if layout.hf_split_dim is None or ctx.tp == 1:
        pieces_per_rank = [layout.unshard(shard.detach(), spec)]
    else:
        shards = [torch.empty_like(shard) for _ in range(ctx.tp)]
        dist.all_gather(shards, shard.detach().contiguous(), group=ctx.tp_group)
        pieces_per_rank = [layout.unshard(s, spec) for s in shards]
    full = [
        torch.cat([pieces[j] for pieces in pieces_per_rank], dim=layout.hf_split_dim or 0)
        for j in range(len(pieces_per_rank[0]))
    ]
    return [t.contiguous() for t in layout.finish(full, spec)]


def _broadcast_from_stage(tensors, src_stage: int, ctx: ParallelContext):
    """Send the owner stage's tensors to every stage of this pipeline (shapes go first)."""
    meta = [[(t.shape, t.dtype) for t in tensors] if tensors is not None else None]
    src = ctx.pp_ranks[src_stage]
    dist.broadcast_object_list(meta, src=src, group=ctx.pp_group)
    if tensors is None:
        tensors = [torch.empty(s, dtype=d, device=ctx.device) for s, d in meta[0]]
    for t in tensors:
        dist.broadcast(t, src=src, group=ctx.pp_group)
    return tensors


def export_hf_weights(
    model: torch.nn.Module,
    ctx: ParallelContext,
    arch: Qwen2Arch,
    *,
    hf_prefix: str = "model.",
    tensor_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for the whole language model on every rank (collective).

    ``tensor_of`` maps each parameter to the tensor exported in its place (default: the
    parameter itself; ``lambda p: p.grad`` exports gradients under HF names). Qwen2.5-VL's
    vision tower follows the language model, under ``visual.*``.
    """
    vision_language = is_vision_language(model)
    if vision_language:
        vision, model = model.vision, language_model_of(model)
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if "_extra_state" not in k}
    if tensor_of is not None:
        state = {k: tensor_of(v) for k, v in state.items()}
    local_of = {g: j for j, g in global_layer_index(model).items()}
    owner = _owner_stages(model, ctx)
    spec = shard_spec(arch, ctx, model.vocab_size)
    for rule, layer in language_model_rules(arch):
        if rule is TIED_OUTPUT_RULE:
            continue  # tied embeddings: HF stores only the embedding
        stage = {"first": 0, "last": ctx.pp - 1}.get(rule.where)
        stage = owner[layer] if stage is None else stage
        tensors = None
        if stage == ctx.pp_rank:
            name = _local_name(rule, layer, state, local_of)
            if name is None:
                raise CheckpointError(f"stage {ctx.pp_rank} lacks {rule.mcore_names(layer)}")
            tensors = _gather_full(rule, state[name], ctx, spec)
        if ctx.pp > 1:
            tensors = _broadcast_from_stage(tensors, stage, ctx)
        yield from zip(rule.hf_names(hf_prefix, layer), tensors, strict=True)
    if vision_language:
        yield from _export_vision(vision, ctx, tensor_of)


def _export_vision(vision, ctx: ParallelContext, tensor_of) -> Iterator[tuple[str, torch.Tensor]]:
    """The first stage's vision tower (replicated over TP) as ``visual.*``, sent to all stages."""
    names = [list(vision_state(vision))] if vision is not None else [None]
    if ctx.pp > 1:
        dist.broadcast_object_list(names, src=ctx.pp_ranks[0], group=ctx.pp_group)
    state = vision_state(vision) if vision is not None else {}
    for name in names[0]:
        tensors = None
        if vision is not None:
            value = state[name] if tensor_of is None else tensor_of(state[name])
            tensors = [value.detach().contiguous()]
        if ctx.pp > 1:
            tensors = _broadcast_from_stage(tensors, 0, ctx)
        yield VISION_HF_PREFIX + name, tensors[0]


def save_hf_checkpoint(
    model: torch.nn.Module,
    ctx: ParallelContext,
    arch: Qwen2Arch,
    out_dir: str | Path,
    *,
    side_files_from: str | Path | None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> None:
    """Collective: write the model as a HF checkpoint (global rank 0 writes, atomically)."""
    stream = export_hf_weights(model, ctx, arch)
    if ctx.rank != 0:
        for _ in stream:
            pass
        dist.barrier()
        return
    staging = AtomicDir(out_dir, overwrite=overwrite)
    try:
        write_safetensors_shards(stream, staging.path, max_shard_bytes=max_shard_bytes)
        if side_files_from is not None:
            copy_side_files(side_files_from, staging.path)
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    finally:
        dist.barrier()
