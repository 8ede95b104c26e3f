"""Data-parallel training over the processes ``accelerate launch`` starts (``lowbit finetune --processes N``).

accelerate starts the processes and sets up ``torch.distributed`` (gloo on CPUs, NCCL on GPUs); lowbit asks it
which process this is and otherwise uses torch.distributed directly: the global batch of every micro-step is split
into equal contiguous shards (:func:`shard`), each process computes its shard's share of the global loss, and
after the micro-batches of an optimizer step the gradients are averaged across processes (:func:`average_`) — so
every process takes the same optimizer step a single process would on the whole batch, and the trained tensors
stay identical without being sent again. Only the main process writes files. A process count is not part of the
training state: a run resumes with any count whose shards divide the batch.

Started without a launcher (``WORLD_SIZE`` unset or 1) everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import LowbitError


@dataclass(frozen=True)
class Processes:
    """This process's place among the data-parallel processes."""

    index: int = 0
    count: int = 1

    @property
    def main(self) -> bool:
        """The one process that writes checkpoints, logs and results."""
        return self.index == 0


def launched() -> bool:
    """Whether a launcher (accelerate, torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main_process() -> bool:
    """Whether this is the process that prints and writes (rank 0, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def processes(device: torch.device | str = "cpu") -> Processes:
    """This process's place, initialising the process group through accelerate on first use (gloo for ``cpu``,
    NCCL for ``cuda``); ``Processes(0, 1)`` when not launched."""
    if not launched():
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=torch.device(device).type == "cpu")
    return Processes(state.process_index, state.num_processes)


def local_device(device: torch.device) -> torch.device:
    """A launched CUDA run puts process ``LOCAL_RANK`` on its own GPU (``cuda`` without an index); else
    ``device``."""
    if device.type == "cuda" and launched():
        rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if rank >= count:
            raise LowbitError(f"process {rank} has no GPU of its own: this machine has {count}; pass --processes "
                              f"{count} or fewer (one per GPU), or --device cpu")
        return torch.device("cuda", rank)
    return device


def check_batch(batch: int, procs: Processes) -> None:
    if batch % procs.count:
        raise LowbitError(f"--batch {batch} does not split over {procs.count} processes: pick a batch that is a "
                          f"multiple of --processes (e.g. {procs.count * max(1, round(batch / procs.count))})")


def shard(indices: torch.Tensor, procs: Processes) -> torch.Tensor:
    """This process's contiguous share of a global micro-batch's example ``indices (batch,)``."""
    check_batch(len(indices), procs)
    size = len(indices) // procs.count
    return indices[procs.index * size:(procs.index + 1) * size]


def average_(tensors: list[torch.Tensor], procs: Processes) -> None:
    """Replace every tensor by its mean over the processes (one flat all-reduce); no-op on one process."""
    if procs.count == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= procs.count
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_(tensors: list[torch.Tensor], procs: Processes) -> None:
    """Give every process the main process's values of ``tensors`` (the trained tensors before step one)."""
    if procs.count == 1:
        return
    for t in tensors:
        torch.distributed.broadcast(t.data, src=0)


def barrier(procs: Processes) -> None:
    """Wait for every process (e.g. until the main one has written or removed a folder)."""
    if procs.count > 1:
        torch.distributed.barrier()


def finish(procs: Processes) -> None:
    """Close the process group (gloo aborts at exit otherwise)."""
    if procs.count > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
