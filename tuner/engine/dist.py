"""Several processes: launching torchrun (or reading Slurm's environment), the process
group, and leaving it cleanly. The collectives are torch.distributed's own.

    NPROC_PER_NODE=8 tuner train CFG                        # one machine, 8 processes
    NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 ADDR=10.0.0.1 PORT=29500 tuner train CFG
    srun -N 2 --ntasks-per-node 8 tuner train CFG --launcher slurm
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from tuner.errors import TunerError


def torchrun_command(argv: list[str]) -> list[str] | None:
    """The torchrun command that runs `tuner train argv` in NPROC_PER_NODE processes, or None
    when this process should train itself (one process, or already started by a launcher)."""
    if "LOCAL_RANK" in os.environ:
        return None
    try:
        nproc = int(os.environ.get("NPROC_PER_NODE", "1"))
        nnodes = int(os.environ.get("NNODES", "1"))
    except ValueError:
        raise TunerError("NPROC_PER_NODE and NNODES must be whole numbers") from None
    if nproc <= 1 and nnodes <= 1:
        return None
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            f"--node_rank={os.environ.get('NODE_RANK', '0')}", f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}",
            f"--master_port={os.environ.get('PORT', '29500')}", "-m", "tuner.cli", "train", *argv]


def launch(command: list[str]) -> int:
    return subprocess.call(command)


def slurm_environment(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed's variables from the ones srun sets."""
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID") if k not in env]
    if missing:
        raise TunerError(f"--launcher slurm but {', '.join(missing)} not set: run under srun")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1")
    first = env.get("MASTER_ADDR") or _first_host(nodes)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"],
            "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
            "MASTER_ADDR": first, "MASTER_PORT": env.get("MASTER_PORT", "29500")}


def _first_host(nodelist: str) -> str:
    """'gpu[01-04,07],cpu1' -> 'gpu01' (what `scontrol show hostnames` lists first)."""
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.rstrip("]").split(",")[0].split("-")[0]
    return head


def process_group_backend(cuda: bool) -> str:
    """NCCL for GPU tensors and gloo for CPU ones (NCCL has none: an all-reduce of a CPU tensor, or
    all_gather_object of the RNG states, would stop a GPU run); gloo alone without GPUs."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


class Distributed:
    """Rank, world size and the process group of this run (a single process is world size 1)."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
            # Long timeout: rank 0 may be answering evaluation questions while the others wait.
            dist.init_process_group(process_group_backend(torch.cuda.is_available()), timeout=timedelta(hours=2))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def sum(self, *values: float | torch.Tensor) -> list[float]:
        """Each value summed over the processes, in one all-reduce of a tensor on this process's
        device (NCCL reduces GPU tensors only)."""
        if not self.enabled:
            return [float(v) for v in values]
        device = self.device()
        tensor = torch.stack([v.detach().to(device, torch.float64).reshape(()) if isinstance(v, torch.Tensor) else
                              torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
        dist.all_reduce(tensor)
        return tensor.tolist()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """A tensor's mean over the processes (all-reduced where it lives: NCCL for GPU tensors)."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def finish(self, exit_code: int) -> None:
        """Leave the process group and exit now: letting Python tear down a gloo group
        aborts about 1 run in 8 ("terminate called without an active exception")."""
        if not self.enabled:
            return
        try:
            dist.barrier()
            dist.destroy_process_group()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)
