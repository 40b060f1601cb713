"""Strict YAML -> typed dataclass loading with dotted command-line overrides.

Every config section is a frozen, keyword-only dataclass. Loading walks the dataclass type hints
and rejects unknown keys and values of the wrong type, naming the dotted key, so a typo in a
recipe fails at start-up instead of being silently ignored at step 4000. A key that moved to
another section is an error too, and the message names its new place (``MOVED_KEYS``).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the dotted key."""


MOVED_KEYS: dict[str, str] = {
    "train.global_batch_size": "sft.global_batch_size",
    "sft.pack_sequences": "train.pack_sequences",
}
"""Keys that moved to the section that owns them: old dotted name -> new dotted name. An old
name is an error naming the new one, never a silent alias, so no recipe keeps a key in a
section that suggests it applies to a phase it does not (``train`` holds only keys that mean
the same for SFT and RL; RL's batch is ``grpo.num_prompts_per_step * grpo.group_size``)."""

REMOVED_KEYS: dict[str, str] = {
    "rollout.weight_bucket_mb": "the weights stream into the rollout engine in one lazily "
    "consumed pass, one tensor at a time (vLLM must see every layer's tensors in one reload)",
}
"""Keys that no longer exist: old dotted name -> why. An error that says so, not a silent no-op."""


def build_dataclass(cls: type[T], raw: Mapping[str, Any] | None, *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, checking keys and types recursively.

    Args:
        cls: the dataclass type to build.
        raw: parsed YAML for this section (``None`` means all defaults).
        prefix: dotted path of this section, used in error messages.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(_unknown_keys_message([_join(prefix, k) for k in unknown], fields))
    kwargs = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in raw}
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field without default was not given
        raise ConfigError(f"{prefix or '<root>'}: {err}") from err
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from err
    return obj


def _unknown_keys_message(keys: Sequence[str], valid: Iterable[str]) -> str:
    """One message for the unknown dotted ``keys`` of a section: moved keys name their new
    place, removed keys say why; the others are listed with the section's ``valid`` keys."""
    parts = [f"{key} moved to {MOVED_KEYS[key]}" for key in keys if key in MOVED_KEYS]
    parts += [f"{key} was removed: {REMOVED_KEYS[key]}" for key in keys if key in REMOVED_KEYS]
    unknown = ", ".join(key for key in keys if key not in MOVED_KEYS and key not in REMOVED_KEYS)
    if unknown:
        parts.append(f"unknown config key(s): {unknown} (valid: {', '.join(sorted(valid))})")
    return "; ".join(parts)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}: {'; '.join(errors)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, prefix=key)
    if origin in (list, tuple, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in pairs)
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text != "" else ""
    return raw


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe, merging an optional ``base:`` recipe (one level, relative path)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_raw = yaml.safe_load((path.parent / base).read_text()) or {}
    if "base" in base_raw:
        raise ConfigError(f"{path.parent / base}: a base recipe cannot have a base of its own")
    return _deep_merge(base_raw, raw)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def to_plain(obj: Any) -> Any:
    """Dataclass tree -> plain YAML-serialisable data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(obj: Any, path: str | Path) -> None:
    """Write a dataclass tree as YAML (the resolved config saved next to a run's outputs)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_plain(obj), sort_keys=False))


__all__ = [
    "MOVED_KEYS",
    "ConfigError",
    "apply_overrides",
    "build_dataclass",
    "dump_yaml",
    "read_recipe",
    "to_plain",
]
