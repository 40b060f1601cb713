"""The HF <-> engine names of the Qwen2.5-VL vision tower (the language model is in
``qwen2_weights``).

The engine runs transformers' own vision module, so the mapping is one to one: engine
``vision.<name>`` <-> HF ``visual.<name>`` (release layout of Qwen2.5-VL-7B-Instruct, which vLLM
and transformers load) or ``model.visual.<name>`` (the layout transformers 5 uses in memory;
accepted on read). Every tensor is replicated on all TP ranks and lives on the first PP stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_metis.checkpoint.hf_io import CheckpointError, HFCheckpointReader

VISION_HF_PREFIX = "visual."
"""Written by ``export_hf_weights`` (release layout)."""
_READ_PREFIXES = ("visual.", "model.visual.")


def is_vision_language(model: torch.nn.Module) -> bool:
    """True for the engine's ``Qwen2_5_VLModel`` (on every PP stage, with or without a tower)."""
    return hasattr(model, "language_model") and hasattr(model, "vision")


def language_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` of an engine model (itself for a text-only model)."""
    return model.language_model if is_vision_language(model) else model


def detect_vision_prefix(names: list[str], hf_dir: str | Path) -> str:
    """The prefix of the vision tensors in a checkpoint; raises if it has none."""
    for prefix in _READ_PREFIXES:
        if any(n.startswith(prefix) for n in names):
            return prefix
    raise CheckpointError(f"{hf_dir}: no vision tower tensors (visual.* or model.visual.*)")


def vision_state(vision: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tower's persistent tensors by engine-local name (``blocks.0.attn.qkv.weight``...)."""
    return dict(vision.state_dict(keep_vars=True))


def load_vision_weights(vision: torch.nn.Module, reader: HFCheckpointReader) -> None:
    """Copy every vision tensor of the checkpoint into ``vision`` (full tensors: replicated).

    Raises:
        CheckpointError: a tensor is missing, has another shape, or the checkpoint holds vision
            tensors the tower does not have (a config / checkpoint mismatch); names the tensor.
    """
    names = reader.names()
    prefix = detect_vision_prefix(names, reader.hf_dir)
    state = vision_state(vision)
    hf_names = {n[len(prefix) :] for n in names if n.startswith(prefix)}
    unexpected = sorted(hf_names - set(state))
    if unexpected:
        raise CheckpointError(
            f"{reader.hf_dir}: vision tensors {[prefix + n for n in unexpected][:5]} have no "
            "place in the vision tower built from config.json"
        )
    for name, param in state.items():
        hf_name = prefix + name
        if name not in hf_names:
            raise CheckpointError(f"{reader.hf_dir}: vision tensor {hf_name!r} is missing")
        found = tuple(reader.shape(hf_name))
        if found != tuple(param.shape):
            raise CheckpointError(
                f"{reader.hf_dir}: tensor {hf_name!r} has shape {list(found)}, the vision "
                f"config expects {list(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(reader.read(hf_name).to(dtype=param.dtype, device=param.device))
