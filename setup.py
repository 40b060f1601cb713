"""megatron_metis: a Megatron-Core trainer for the Metis-RISE recipe (RL, then targeted SFT).

The Triton kernels live in the top-level ``kernels/`` folder of the repository, each in its own
package, and are installed as ``megatron_metis.kernels.<name>``. That folder has no
``__init__.py`` on purpose: PyPI's ``kernels`` package (which transformers imports) must win
``import kernels`` even when the repository root is first on ``sys.path``.

Installs are locked: requirements/cpu.txt and requirements/gpu.txt pin every package, generated
from the ranges below by ``make lock``. The ranges stay ranges: other projects install this one
as a library.
"""

from setuptools import find_packages, setup

_PACKAGES = find_packages(include=["megatron_metis", "megatron_metis.*"])
_KERNEL_DIRS = {
    "megatron_metis.kernels." + name: "kernels/" + name.replace(".", "/")
    for name in find_packages(where="kernels")
}

setup(
    name="megatron_metis",
    version="0.1.0",
    description="Metis-RISE (RL incentivizes, SFT enhances) for vision-language models on Megatron-Core",
    python_requires=">=3.11",
    packages=_PACKAGES + list(_KERNEL_DIRS),
    package_dir=_KERNEL_DIRS,
    package_data={"megatron_metis": ["assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.13",
        # 0.17+ declares Python >=3.12; NGC containers ship newer releases. The code is kept
        # working across the whole range.
        "megatron-core>=0.16.1,<0.20",
        "transformers>=5.16.1,<6",
        "tokenizers",
        "safetensors",
        "numpy",
        "pyyaml",
        "pillow",
        "pyarrow",
        "math-verify[antlr4_13_2]>=0.9",
        "sympy",
        "psutil",  # megatron.core.dist_checkpointing writers need it
        "tensorboard",
        "tqdm",
        "rich",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["vllm==0.32.0", "transformer-engine[pytorch]"],
        "dev": ["pytest", "pytest-timeout", "ruff", "triton"],
    },
    entry_points={"console_scripts": ["metis = megatron_metis.cli.main:main"]},
)
