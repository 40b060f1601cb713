"""The architecture's import rules (DESIGN.md "Layers"), checked on the source of every module.

Lazy imports inside functions count too: a layer violation is one whether it runs at import
time or later.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# Lowest first; names in one tier are siblings that must not import each other.
TIERS = [
    ["utils"],
    ["config"],
    ["data", "rewards", "kernels"],
    ["parallel"],
    ["models"],
    ["checkpoint"],
    ["rollout", "algorithms"],
    ["trainer"],
    ["stages"],
    ["cli"],
]
TIER_OF = {name: i for i, tier in enumerate(TIERS) for name in tier}
# Third-party packages confined to some layers (prefix of the module path under the package).
CONFINED = {
    "megatron": ("parallel", "models", "checkpoint", "trainer"),
    "vllm": ("rollout/vllm_engine.py",),
    "transformer_engine": ("models",),
    "triton": ("kernels",),
}


def _sources() -> list[tuple[str, Path]]:
    """(path relative to the megatron_metis namespace, file) for every module."""
    out = [
        (str(p.relative_to(ROOT / "megatron_metis")), p)
        for p in (ROOT / "megatron_metis").rglob("*.py")
    ]
    out += [
        ("kernels/" + str(p.relative_to(ROOT / "kernels")), p)
        for p in (ROOT / "kernels").rglob("*.py")
    ]
    return out


def _imports(path: Path, package: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: stays inside the module's own package
                names.add(f"megatron_metis.{package}")
            elif node.module:
                names.add(node.module)
    return names


@pytest.mark.parametrize("rel,path", _sources(), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_point_down_the_layers(rel, path):
    package = rel.split("/")[0]
    if package not in TIER_OF:  # the package's own __init__.py
        return
    for name in _imports(path, package):
        parts = name.split(".")
        if parts[0] == "megatron_metis" and len(parts) > 1 and parts[1] in TIER_OF:
            target = parts[1]
            if target == package:
                continue
            assert TIER_OF[target] < TIER_OF[package], (
                f"{rel} imports megatron_metis.{target}: "
                f"{'a sibling' if TIER_OF[target] == TIER_OF[package] else 'a higher layer'}"
            )
        allowed = CONFINED.get(parts[0])
        if allowed is not None and parts[0] != "megatron_metis":
            assert rel.startswith(allowed), f"{rel} imports {parts[0]}, allowed only in {allowed}"


def test_triton_only_in_triton_modules():
    for rel, path in _sources():
        if "triton" in {n.split(".")[0] for n in _imports(path, rel.split("/")[0])}:
            assert Path(rel).name.startswith("triton_"), f"{rel} imports triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only guard")
def test_transformer_engine_is_not_installed_on_cpu():
    """Even a partial Transformer Engine install breaks `import megatron.core` on a CPU box."""
    assert importlib.util.find_spec("transformer_engine") is None
