"""The project's Triton kernels and their PyTorch references, as ``megatron_metis.kernels.*``.

Their sources live in the repository's top-level ``kernels/`` folder; setup.py installs each
package found there under this namespace. That folder deliberately has no ``__init__.py``: PyPI
has a package called ``kernels`` (transformers imports it), and a regular package named
``kernels`` at the repository root would shadow it whenever the root is on ``sys.path``
(``python -m ...``, ``python -c ...``). As a plain folder it can never win that import.
"""
