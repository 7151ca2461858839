"""torch.distributed helpers for ``torchrun`` launches (one process per GPU, or CPU with gloo).

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is single-process and nothing
is initialised. The model itself all-gathers ITC features and all-reduces its centres whenever
``torch.distributed`` is initialised; this module only sets the process group up and down.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (which logs, checkpoints and evaluates)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the process group from torchrun's environment, pick this rank's device.

    Args:
        device: "cuda", "cpu" or None (= CUDA when available). Backend: NCCL on CUDA, gloo on CPU.
        timeout_s: collective timeout.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank, world_size, local_rank, dev)


def barrier() -> None:
    """Synchronise all ranks (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor) -> torch.Tensor:
    """Mean of a scalar/tensor over ranks (returns a float64 CPU tensor copy; no-op single-process)."""
    t = torch.as_tensor(value, dtype=torch.float64).clone()
    if dist.is_available() and dist.is_initialized():
        backend_cuda = dist.get_backend() == "nccl"
        t = t.cuda() if backend_cuda else t
        dist.all_reduce(t)
        t = (t / dist.get_world_size()).cpu()
    return t


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Destroy the process group if one was initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
