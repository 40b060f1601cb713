"""Kernel tests: without CUDA, Triton runs in its interpreter (``TRITON_INTERPRET=1``, set by
the root ``tests/conftest.py`` before anything imports triton); GPU tests skip there too."""
