"""Distributed layout: ``ParallelContext`` (TP/PP/CP/DP groups), its small collectives,
launchers, Megatron CPU shim."""

from megatron_metis.parallel.collectives import (
    broadcast_from_generator,
    from_last_stage,
    global_count,
    max_over_dp,
    sum_over_dp,
)
from megatron_metis.parallel.context import ParallelContext, init_parallel, single_process_context
from megatron_metis.parallel.env import DistributedEnv, detect_distributed_env
from megatron_metis.parallel.launch import WorkerError, launched_externally, spawn

__all__ = [
    "DistributedEnv",
    "ParallelContext",
    "WorkerError",
    "broadcast_from_generator",
    "detect_distributed_env",
    "from_last_stage",
    "global_count",
    "init_parallel",
    "launched_externally",
    "max_over_dp",
    "single_process_context",
    "spawn",
    "sum_over_dp",
]
