"""The architecture's import rules (DESIGN.md "Layers"), checked on the source of every module.

Every form of import counts: ``import a.b``, ``from a import b`` (``from megatron_metis import
trainer`` imports the trainer package), ``from a.b import c``, relative imports (``from . import
x``, ``from ..x import y``), ``importlib.import_module("a.b")`` with a literal name, and lazy
imports inside functions: a layer violation is one whether it runs at import time or later.
The self-tests at the end feed the checker synthetic modules, one per form.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "megatron_metis"
# Lowest first; names in one tier are siblings that must not import each other.
TIERS = [
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
    "megatron": ("parallel/", "models/", "checkpoint/", "trainer/"),
    "vllm": ("rollout/vllm_engine.py",),
    "transformer_engine": ("models/",),
    "triton": ("kernels/",),
}


def _sources() -> list[tuple[str, Path]]:
    """(path relative to the megatron_metis namespace, file) for every module; the top-level
    ``kernels/`` folder is installed as ``megatron_metis.kernels``."""
    out = [(p.relative_to(ROOT / PACKAGE).as_posix(), p) for p in (ROOT / PACKAGE).rglob("*.py")]
    out += [
        ("kernels/" + p.relative_to(ROOT / "kernels").as_posix(), p)
        for p in (ROOT / "kernels").rglob("*.py")
    ]
    return sorted(out)


def _module_name(rel: str) -> tuple[str, bool]:
    """``trainer/engine.py`` -> (``megatron_metis.trainer.engine``, False); a package's
    ``__init__.py`` -> (the package, True)."""
    parts = [PACKAGE, *rel.removesuffix(".py").split("/")]
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported_modules(rel: str, source: str) -> set[str]:
    """Absolute names of everything the module at ``rel`` imports, anywhere in its source.

    ``from a import b`` gives ``a.b``: ``b`` may be a module or a name defined in ``a``, and
    either way the import depends on the package ``a`` and what it re-exports.
    """
    module, is_package = _module_name(rel)
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{a.name}" for a in node.names if a.name != "*")
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def violations(rel: str, source: str) -> list[str]:
    """The layer and confinement rules the module at ``rel`` (path under the namespace)
    breaks, one message per offending package."""
    own = rel.split("/")[0] if "/" in rel else None  # None: the namespace's own __init__.py
    found = set()
    for name in imported_modules(rel, source):
        parts = name.split(".")
        if parts[0] == PACKAGE:
            target = parts[1] if len(parts) > 1 else None
            if target not in TIER_OF or target == own:
                continue
            if own is None:
                found.add(f"{rel} imports {PACKAGE}.{target}: the namespace imports no layer")
            elif TIER_OF[target] >= TIER_OF[own]:
                kind = "a sibling" if TIER_OF[target] == TIER_OF[own] else "a higher layer"
                found.add(f"{rel} imports {PACKAGE}.{target}: {kind}")
        elif parts[0] in CONFINED and not rel.startswith(CONFINED[parts[0]]):
            found.add(f"{rel} imports {parts[0]}, allowed only in {CONFINED[parts[0]]}")
        if parts[0] == "triton" and not Path(rel).name.startswith("triton_"):
            found.add(f"{rel} imports triton outside a triton_* module")
    return sorted(found)


def test_tiers_are_the_real_packages():
    """Every sub-package of the namespace is in a tier and every tier names a real one."""
    real = {p.parent.name for p in (ROOT / PACKAGE).glob("*/__init__.py")}
    assert real == set(TIER_OF)


@pytest.mark.parametrize("rel,path", _sources(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_down_the_layers(rel, path):
    assert violations(rel, path.read_text()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only guard")
def test_transformer_engine_is_not_installed_on_cpu():
    """Even a partial Transformer Engine install breaks `import megatron.core` on a CPU box."""
    assert importlib.util.find_spec("transformer_engine") is None


# Self-tests: each snippet, placed in config/ (the lowest layer), imports trainer/.
UPWARD_IMPORTS = {
    "import a.b": "import megatron_metis.trainer.engine",
    "import a.b as c": "import megatron_metis.trainer as t",
    "from a import b": "from megatron_metis import trainer",
    "from a import b, c": "from megatron_metis import config, trainer",
    "from a.b import c": "from megatron_metis.trainer import engine",
    "from a.b.c import d": "from megatron_metis.trainer.engine import TrainEngine",
    "from .. import b": "from .. import trainer",
    "from ..b import c": "from ..trainer import engine",
    "from ..b.c import d": "from ..trainer.engine import TrainEngine",
    "lazy, in a function": "def f():\n    from megatron_metis.trainer import engine\n",
    "lazy, in a method": "class A:\n    def f(self):\n        import megatron_metis.trainer\n",
    "import_module": "import importlib\nimportlib.import_module('megatron_metis.trainer')",
}


@pytest.mark.parametrize("form", sorted(UPWARD_IMPORTS))
def test_checker_reports_an_upward_import_of_every_form(form):
    [found] = violations("config/snippet.py", UPWARD_IMPORTS[form])
    assert "megatron_metis.trainer: a higher layer" in found


@pytest.mark.parametrize(
    "rel,source,message",
    [
        ("data/x.py", "from megatron_metis.rewards import verifier", "rewards: a sibling"),
        ("rollout/x.py", "from ..algorithms import grpo", "algorithms: a sibling"),
        ("data/pkg/__init__.py", "from ... import rewards", "rewards: a sibling"),
        ("__init__.py", "from . import config", "the namespace imports no layer"),
        ("data/x.py", "from megatron.core import parallel_state", "imports megatron"),
        ("trainer/x.py", "def f():\n    import vllm\n", "imports vllm"),
        ("trainer/x.py", "import transformer_engine.pytorch", "imports transformer_engine"),
        ("kernels/op/function.py", "import triton", "outside a triton_* module"),
    ],
)
def test_checker_reports_siblings_and_confined_packages(rel, source, message):
    found = violations(rel, source)
    assert len(found) == 1 and message in found[0], found


@pytest.mark.parametrize(
    "rel,source",
    [
        ("trainer/x.py", "from megatron_metis import models\nfrom ..config import MetisConfig"),
        ("config/x.py", "from . import loader\nfrom .loader import ConfigError"),
        ("config/pkg/__init__.py", "from .. import loader"),
        ("kernels/op/__init__.py", "from .function import f\nfrom . import chunked"),
        ("kernels/op/triton_impl.py", "import triton\nimport triton.language as tl"),
        ("rollout/vllm_engine.py", "def f():\n    from vllm import LLM\n"),
        ("models/specs.py", "import megatron.core\nimport transformer_engine"),
        ("data/x.py", "import torch\nfrom transformers import AutoTokenizer"),
    ],
)
def test_checker_accepts_imports_that_point_down(rel, source):
    assert violations(rel, source) == []
