"""Build-time check of the GPU image: every GPU dependency imports against the installed torch.

Run by docker/Dockerfile as the last layer, so an image whose Transformer Engine or vLLM was built
for another torch fails to build instead of failing on the cluster.
"""

from __future__ import annotations

import importlib
import sys


def main() -> int:
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    failed = []
    for name in ("megatron.core", "transformer_engine.pytorch", "vllm", "triton", "megatron_metis"):
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure fails the build
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        print(f"{name} {getattr(module, '__version__', '')}".rstrip())
    for line in failed:
        print(f"import failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
