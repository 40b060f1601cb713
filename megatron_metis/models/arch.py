"""The architecture numbers of a Qwen2 / Qwen2.5 language model, read from a Hugging Face config."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_metis.config import ConfigError


@dataclass(frozen=True)
class Qwen2Arch:
    """Shape of the decoder; for Qwen2.5-VL these are the numbers of its text model."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    mrope_section: tuple[int, ...] | None = None
    """M-RoPE split of the rotary half-dimension into (temporal, height, width); Qwen2.5-VL only."""

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> Qwen2Arch:
        """Build from a parsed ``config.json`` (Qwen2 or Qwen2.5-VL, transformers 4.x or 5.x)."""
        text = hf.get("text_config") or hf
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_theta = text.get("rope_theta", rope.get("rope_theta", hf.get("rope_theta")))
        mrope = rope.get("mrope_section")
        try:
            num_heads = int(text["num_attention_heads"])
            hidden = int(text["hidden_size"])
            return cls(
                vocab_size=int(text.get("vocab_size", hf.get("vocab_size"))),
                hidden_size=hidden,
                ffn_hidden_size=int(text["intermediate_size"]),
                num_layers=int(text["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(text.get("num_key_value_heads") or num_heads),
                head_dim=int(text.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(text["rms_norm_eps"]),
                rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
                max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(
                    hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
                ),
                mrope_section=tuple(int(x) for x in mrope) if mrope else None,
            )
        except KeyError as err:
            raise ConfigError(f"config.json lacks the key {err.args[0]!r}") from None

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> Qwen2Arch:
        path = Path(hf_dir) / "config.json"
        try:
            return cls.from_hf_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"no config.json in {hf_dir}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err

    def padded_vocab_size(self, tp: int, divisible_by: int) -> int:
        """Rows of the embedding table: vocab rounded up to a multiple of lcm(divisible_by, tp)."""
        multiple = math.lcm(divisible_by, tp)
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tp: int, pp: int) -> None:
        """Fail early, naming the config.json key, when the model cannot be split this way."""
        if self.num_heads % tp:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not divisible by parallel.tp={tp}"
            )
        if self.num_kv_heads % tp:
            raise ConfigError(
                f"num_key_value_heads={self.num_kv_heads} is not divisible by parallel.tp={tp} "
                "(the fused QKV weight is split by KV head)"
            )
        if self.ffn_hidden_size % tp:
            raise ConfigError(
                f"intermediate_size={self.ffn_hidden_size} is not divisible by parallel.tp={tp}"
            )
        if self.num_layers % pp:
            raise ConfigError(
                f"num_hidden_layers={self.num_layers} is not divisible by parallel.pp={pp}"
            )
