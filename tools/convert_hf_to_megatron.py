#!/usr/bin/env python3
"""Convert a Hugging Face checkpoint into a megatron_metis (Megatron dist) checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir D --out-dir O --tp N --pp M

Same as ``metis convert hf-to-megatron``. Starts N*M local processes on a CPU box, or runs in the
processes of torchrun / srun.
"""

import sys

from megatron_metis.cli.convert_cmd import main_hf_to_megatron

if __name__ == "__main__":
    sys.exit(main_hf_to_megatron())
