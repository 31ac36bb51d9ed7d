"""Many processes through torch.distributed: who am I, which calibration batches are mine, and summing statistics.

The same code runs in one process without any launcher (rank 0 of 1, every collective a no-op) and under
``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment: ``init_from_env`` joins the process group, gloo on CPU,
NCCL on GPU). Statistics are sums and counts, so all-reducing them gives what one process computes over all
batches, up to the order of floating-point additions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastprune.errors import ConfigError

logger = logging.getLogger("fastprune")


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes (``rank`` 0 of 1 without a process group)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes outputs and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """True when a launcher (torchrun) started this process (as one of one or several)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env() -> Ranks:
    """Join the process group torchrun describes (gloo on CPU, NCCL when CUDA is available); idempotent."""
    if not dist.is_available():
        return Ranks()
    if not dist.is_initialized() and launched():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        logger.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    return current()


def current() -> Ranks:
    """This process's rank and the world size (0 of 1 when no process group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def device() -> torch.device:
    """Where collectives want their tensors: this rank's GPU under NCCL, else the CPU."""
    if current().distributed and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: list, what: str = "calibration batches") -> tuple[list, list[int]]:
    """This rank's contiguous share of ``items`` and their global indices; refuse a count the ranks do not divide
    (uneven shares would weigh ranks differently and make collectives wait for ranks that have nothing left)."""
    ranks = current()
    n = len(items)
    if n % ranks.world:
        raise ConfigError(
            f"{n} {what} cannot be shared evenly by {ranks.world} processes; choose a number of {what} that is a "
            f"multiple of {ranks.world} (calibration: --samples = batches x --batch-size)"
        )
    per = n // ranks.world
    start = ranks.rank * per
    return items[start : start + per], list(range(start, start + per))


def all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over all ranks in place (nothing to do in one process)."""
    if not current().distributed:
        return
    where = device()
    for t in tensors:
        if t.device == where:
            dist.all_reduce(t)
        else:
            moved = t.to(where)
            dist.all_reduce(moved)
            t.copy_(moved)


def all_reduce_mean(value: float) -> float:
    """The mean of a number over all ranks."""
    ranks = current()
    if not ranks.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return float(t) / ranks.world


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(value, what: str) -> None:
    """Raise on every rank when ranks computed different values of something they must agree on."""
    if not current().distributed:
        return
    values = [None] * current().world
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"processes disagree on {what}; the all-reduced statistics differ between ranks")


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if current().distributed:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
