"""docker/: the Dockerfile copies files that exist and installs from the GPU lock in the order
that builds Transformer Engine against the locked torch, and the image check fails on a missing
GPU dependency (it runs as the image's last build layer; here there is no Transformer Engine)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_copies_existing_paths():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    sources = [
        src
        for line in re.findall(r"^COPY (.+)$", text, flags=re.M)
        for src in line.split()[:-1]
        if not src.startswith("--")
    ]
    assert "requirements/gpu.txt" in sources
    for src in sources:
        assert src == "." or (ROOT / src).exists(), f"Dockerfile copies a missing path: {src}"
    assert "python docker/check_image.py" in text


def test_dockerfile_installs_the_gpu_lock_then_transformer_engine_against_its_torch():
    runs = [" ".join(step.split()) for step in re.findall(r"^RUN (.+)$", _joined(), re.M)]
    lock_step = next(i for i, s in enumerate(runs) if "grep -v -E '^transformer[-_]engine'" in s)
    te_step = next(i for i, s in enumerate(runs) if "grep -E '^transformer[-_]engine'" in s)
    assert lock_step < te_step
    assert "pip install -r" in runs[lock_step]
    assert "--no-build-isolation" in runs[te_step] and "--no-deps" in runs[te_step]
    # the base image's own pip constraint (its torch) is switched off
    assert re.search(r"^\s*PIP_CONSTRAINT= ", (ROOT / "docker" / "Dockerfile").read_text(), re.M)


def _joined() -> str:
    """The Dockerfile with backslash continuations joined."""
    return (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")


def test_image_check_fails_without_transformer_engine(capsys):
    spec = importlib.util.spec_from_file_location("check_image", ROOT / "docker" / "check_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == 1
    err = capsys.readouterr().err
    assert "import failed: transformer_engine.pytorch" in err
