"""Kernel tests: without CUDA, Triton runs in its interpreter (GPU tests skip: tests/conftest.py).

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, i.e. when a
``triton_impl`` module is first imported, so it is set here, at collection, before any test
module imports one (and spawned TP ranks inherit it).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
