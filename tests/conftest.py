"""Suite-wide settings (offline hub, GPU tests skipped without CUDA) and the tiny tokenizer.

The tiny models are built by ``tests/tiny_models.py`` on the product's ``models.tiny``.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
