"""torch.distributed helpers for ``torchrun`` launches (one process per GPU, or CPU with gloo).

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is single-process and nothing
is initialised. The model all-gathers ITC features (:func:`all_gather_no_grad`) and averages its centres over
ranks (:func:`mean_over_ranks`) whenever ``torch.distributed`` is initialised; both are identities
in a single process.
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


def is_distributed() -> bool:
    """True when a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (N, ...) from every rank along dim 0 (no gradient); identity alone."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a new tensor; ``x`` itself when not distributed)."""
    if not is_distributed():
        return x
    x = x.clone()  # all_reduce works in place
    dist.all_reduce(x)
    return x / dist.get_world_size()


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an FSDP2 parameter; a view, so in-place ops write the
    shard); ``t`` itself for a plain tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
