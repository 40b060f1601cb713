"""Suite-wide settings (offline hub, Triton's interpreter without CUDA, GPU tests skipped without
CUDA) and the tiny tokenizer.

The tiny models are built by ``tests/tiny_models.py`` on the product's ``models.tiny``.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without CUDA the Triton kernels run in Triton's interpreter. TRITON_INTERPRET is read when
# ``@triton.jit`` decorates a function, triton's own ``triton.language`` helpers included, so it
# must be set before anything imports triton: importing transformers' models does (through
# torch._dynamo), and test modules of any folder do that at collection. Hence here, in the root
# conftest, which pytest imports first; spawned ranks inherit it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The project's tiny tokenizer (Qwen special tokens and chat template), built offline."""
    from megatron_metis.data.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()
