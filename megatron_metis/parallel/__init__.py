"""Distributed layout: ``ParallelContext`` (TP/PP/CP/DP groups), launchers, Megatron CPU shim."""

from megatron_metis.parallel.context import ParallelContext, init_parallel, single_process_context
from megatron_metis.parallel.env import DistributedEnv, detect_distributed_env
from megatron_metis.parallel.launch import WorkerError, launched_externally, spawn

__all__ = [
    "DistributedEnv",
    "ParallelContext",
    "WorkerError",
    "detect_distributed_env",
    "init_parallel",
    "launched_externally",
    "single_process_context",
    "spawn",
]
