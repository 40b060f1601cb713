"""Run a function on N local processes (CPU tools and tests), or in place under torchrun/srun."""

from __future__ import annotations

import os
import pickle
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch.multiprocessing as mp

from megatron_metis.parallel.env import find_free_port


class WorkerError(RuntimeError):
    """A spawned rank raised; the message carries that rank's traceback."""


def launched_externally(environ: Mapping[str, str]) -> bool:
    """True when torchrun or Slurm already started one process per rank."""
    return ("RANK" in environ and "WORLD_SIZE" in environ) or "SLURM_PROCID" in environ


def _worker(rank: int, fn, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        # Plain pickle bytes: torch's queue reductions share tensors through file descriptors,
        # which break once this process has exited.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1) from None


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes that form one torch.distributed job.

    Each process gets RANK/WORLD_SIZE/MASTER_* set as torchrun would. Returns the per-rank return
    values. A rank that raises or dies, or a job that runs past ``timeout_s`` (a hung collective),
    kills all ranks and raises, so a test or tool never hangs.
    """
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, fn, world_size, port, args, results))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    outputs: dict[int, Any] = {}
    try:
        while len(outputs) < world_size:
            while not results.empty():
                rank, ok, value = results.get()
                if not ok:
                    raise WorkerError(f"rank {rank} failed:\n{value}")
                outputs[rank] = pickle.loads(value)
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead and results.empty():
                raise WorkerError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed job of {world_size} ranks ran past {timeout_s}s")
            time.sleep(0.05)
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    return [outputs[r] for r in range(world_size)]
