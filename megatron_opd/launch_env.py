"""Rank layout of this process as its launcher (torchrun or srun) describes it.

Read from the environment only, without torch, so the command line can report a mistake
once (on rank 0) before anything heavy is imported.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_rank(environ: dict[str, str] | None = None) -> int:
    """This process's global rank (0 without a launcher); no port is chosen."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"])
    return 0


def launch_world_size(environ: dict[str, str] | None = None) -> int:
    """Number of processes in the job (1 without a launcher)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_NTASKS"])
    return 1


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    """Rank layout of this process as told by the launcher."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    master_addr: str
    """Rendezvous host."""
    master_port: int
    """Rendezvous port."""


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read rank/world/rendezvous from torchrun variables, else from SLURM's.

    Under ``srun``, MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST
    (``scontrol show hostnames``) and MASTER_PORT to 29500 + job id % 1000.
    A single process with no launcher is rank 0 of 1 on localhost, on a free port.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        master_addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST"))
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=master_addr,
            master_port=int(env.get("MASTER_PORT", str(29500 + job_id % 1000))),
        )
    # No launcher: a single process. A fixed default port would make two such runs on
    # one host collide, so take a free one unless MASTER_PORT says otherwise.
    return LaunchEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT") or free_port()),
    )


def _first_slurm_host(nodelist: str | None) -> str:
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        return out.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # Without scontrol a plain single-host list ("node01") is still usable.
        if "[" not in nodelist and "," not in nodelist:
            return nodelist
        raise ValueError(
            f"cannot resolve MASTER_ADDR from SLURM_JOB_NODELIST={nodelist!r}: scontrol is "
            "not available; export MASTER_ADDR in the sbatch script"
        ) from None
