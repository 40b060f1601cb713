"""``ParallelContext``: the process groups and ranks of a run, created once and passed down.

Megatron-Core keeps its model-parallel groups in module globals (``parallel_state``); this is the
only module that initialises or reads them. Everything else receives a ``ParallelContext``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_metis.config import ConfigError, ParallelConfig
from megatron_metis.parallel.env import DistributedEnv, detect_distributed_env


@dataclass(frozen=True)
class ParallelContext:
    """Ranks, sizes and process groups of the TP x CP x DP x PP layout of this process."""

    env: DistributedEnv
    device: torch.device
    backend: str
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    sequence_parallel: bool
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    """Pure data-parallel group (excludes CP)."""
    dp_cp_group: dist.ProcessGroup
    """Data- and context-parallel ranks together: where gradients are reduced."""
    pg_collection: object
    """Megatron-Core ``ProcessGroupCollection`` handed to model builders."""

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this process's pipeline group, stage 0 first."""
        return dist.get_process_group_ranks(self.pp_group)

    def barrier(self) -> None:
        dist.barrier()

    def destroy(self) -> None:
        """Tear down Megatron's model-parallel state and the default process group."""
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(cfg: ParallelConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("parallel.device is 'cuda' but no CUDA device is available")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def init_parallel(
    cfg: ParallelConfig, *, seed: int = 1234, environ: Mapping[str, str] | None = None
) -> ParallelContext:
    """Initialise torch.distributed and Megatron's model-parallel state for ``cfg``.

    Works under torchrun, Slurm's srun, ``parallel.launch.spawn`` and as a single process.
    gloo (plus the Megatron CPU shim) on the CPU, NCCL on GPUs.
    """
    env = detect_distributed_env(os.environ if environ is None else environ)
    model_parallel = cfg.tp * cfg.pp * cfg.cp
    if env.world_size % model_parallel:
        raise ConfigError(
            f"world size {env.world_size} is not divisible by parallel.tp*pp*cp = {model_parallel}"
        )
    device = resolve_device(cfg, env.local_rank)
    if cfg.sequence_parallel and device.type == "cpu":
        raise ConfigError("parallel.sequence_parallel needs Transformer Engine layers on a GPU")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cpu":
        from megatron_metis.parallel.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=cfg.timeout_s),
        )
    return _init_model_parallel(cfg, env, device, backend, seed)


def _init_model_parallel(
    cfg: ParallelConfig, env: DistributedEnv, device: torch.device, backend: str, seed: int
) -> ParallelContext:
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        context_parallel_size=cfg.cp,
        create_gloo_process_groups=True,  # Megatron's optimizer always asks for them
    )
    # On the CPU the CUDA RNG tracker cannot be used; the inference tracker makes its fork() a
    # no-op, which is exact because the engine runs without dropout.
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=device.type == "cpu")
    torch.manual_seed(seed)
    return ParallelContext(
        env=env,
        device=device,
        backend=backend,
        tp=cfg.tp,
        pp=cfg.pp,
        cp=cfg.cp,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        sequence_parallel=cfg.sequence_parallel and cfg.tp > 1,
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def single_process_context(seed: int = 1234, device: str = "auto") -> ParallelContext:
    """A world of one process (TP=PP=CP=DP=1): for tools and unit tests."""
    return init_parallel(ParallelConfig(device=device), seed=seed, environ={})
