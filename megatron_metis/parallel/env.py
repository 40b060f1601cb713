"""Where this process sits in the job: read from torchrun or Slurm (srun) environment variables."""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistributedEnv:
    """Rank layout and rendezvous address of one process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """``torchrun``, ``slurm`` or ``single``."""


def detect_distributed_env(environ: Mapping[str, str]) -> DistributedEnv:
    """torchrun's RANK/WORLD_SIZE first, then Slurm's SLURM_PROCID/SLURM_NTASKS, else one process.

    Under Slurm the rendezvous host is the first node of ``SLURM_JOB_NODELIST`` and the port is
    derived from the job id, so every task of an ``srun`` agrees without a launcher.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistributedEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", "0")),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodes = expand_slurm_nodelist(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        job_id = int(environ.get("SLURM_JOB_ID", "0"))
        return DistributedEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", "0")),
            master_addr=environ.get("MASTER_ADDR", nodes[0]),
            master_port=int(environ.get("MASTER_PORT", str(20000 + job_id % 20000))),
            launcher="slurm",
        )
    return DistributedEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr="127.0.0.1",
        master_port=int(environ.get("MASTER_PORT", "0")) or find_free_port(),
        launcher="single",
    )


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compact host list: ``"gpu[01-03,07],login1"`` -> 4 + 1 host names."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            start, _, end = part.partition("-")
            if not end:
                hosts.append(prefix + start)
                continue
            width = len(start)
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(start), int(end) + 1))
    return hosts


def find_free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
