#!/usr/bin/env python3
"""Convert a megatron_metis checkpoint into a Hugging Face folder (transformers / vLLM ready).

    python tools/convert_megatron_to_hf.py --ckpt-dir O --out-dir H [--tp N --pp M]

Same as ``metis convert megatron-to-hf``. Config, tokenizer and generation files are copied from
the checkpoint, so ``from_pretrained(H)`` and ``vllm.LLM(H)`` work directly.
"""

import sys

from megatron_metis.cli.convert_cmd import main_megatron_to_hf

if __name__ == "__main__":
    sys.exit(main_megatron_to_hf())
