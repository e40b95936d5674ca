"""Distributed helpers: process-group setup from the launcher's environment, rank queries.

``torchrun`` (single or multi node) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. Under SLURM with one task per GPU (``srun``, or Hydra's submitit launcher) there
is no torchrun: the ranks come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the
rendezvous host is the first node of SLURM_JOB_NODELIST. Without either, everything runs as
a single process.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mink_ssl.engine.rundir import RunDir


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    m = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")
    prefix, ranges = m.groups()
    return prefix + (re.split(r"[,-]", ranges)[0] if ranges else "")


def rendezvous_from_env(environ=os.environ) -> tuple[DistInfo, dict[str, str]]:
    """(rank info, environment variables to set for ``init_process_group("env://")``).

    torchrun's variables win; otherwise a SLURM job with several tasks (one per GPU) is a
    process group rendezvousing at the first node, port MASTER_PORT (default 29500).
    """
    if "WORLD_SIZE" in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return DistInfo(int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1")),
                        int(environ.get("LOCAL_RANK", "0"))), {}
    info = DistInfo(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                    int(environ.get("SLURM_LOCALID", "0")))
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist and "MASTER_ADDR" not in environ:
        raise RuntimeError("SLURM_NTASKS > 1 but neither SLURM_JOB_NODELIST nor MASTER_ADDR is "
                           "set: launch with srun/sbatch or set MASTER_ADDR")
    return info, {"RANK": str(info.rank), "WORLD_SIZE": str(info.world_size),
                  "LOCAL_RANK": str(info.local_rank),
                  "MASTER_ADDR": environ.get("MASTER_ADDR") or first_slurm_host(nodelist),
                  "MASTER_PORT": environ.get("MASTER_PORT", "29500")}


def init_distributed(device: str = "auto", backend: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group the launcher describes (if any); returns (info, this rank's
    device)."""
    info, env = rendezvous_from_env()
    os.environ.update(env)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info, dev


def sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every batch-norm layer synchronised over the ranks: the sparse ones
    (``MinkowskiBatchNorm`` wraps a ``torch.nn.BatchNorm1d``) and the dense ones of task heads
    alike, by converting each inner ``torch.nn`` batch norm to ``torch.nn.SyncBatchNorm`` (what
    ``MinkowskiSyncBatchNorm`` holds too; its converter alone leaves dense heads unsynchronised).
    Statistics are then those of the global batch, as on one process."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device, sync_bn: bool,
             find_unused_parameters: bool) -> torch.nn.Module:
    """``module`` as this rank's DistributedDataParallel replica (unchanged on one process);
    ``sync_bn`` converts batch norm to SyncBatchNorm first (CUDA only: no CPU kernel)."""
    if not info.enabled:
        return module
    if sync_bn and device.type == "cuda":
        module = sync_batchnorm(module)
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)


def start_run(out_dir: Path, config: dict, info: DistInfo, resume: str | None = None,
              resume_override: bool = False, print_fn=print, what: str = "training run",
              comparable=None):
    """The run directory, locked (rank 0) and checked against ``config`` and ``resume``
    (:class:`~mink_ssl.engine.rundir.RunDir`, configs compared in the task's ``comparable``
    form); nothing is written until ``record()``."""
    return RunDir(out_dir, config, resume, resume_override, info.is_main, print_fn, what,
                  world_size=info.world_size, comparable=comparable).open()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
