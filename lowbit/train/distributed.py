"""Data-parallel training over the processes ``accelerate launch`` starts (``lowbit finetune --processes N``).

accelerate starts the processes and sets up ``torch.distributed`` (gloo on CPUs, NCCL on GPUs); lowbit asks it
which process this is and otherwise uses torch.distributed directly: the global batch of every micro-step is split
into equal contiguous shards (:func:`shard`), each process computes its shard's share of the global loss, and
after the micro-batches of an optimizer step the gradients are averaged across processes (:func:`average_`) — so
every process takes the same optimizer step a single process would on the whole batch, and the trained tensors
stay identical without being sent again. Only the main process writes files. A process count is not part of the
training state: a run resumes with any count whose shards divide the batch.

With FSDP (``lowbit finetune --processes N --fsdp``, :func:`fsdp_shard`) a copy of the model trains instead whose
float parameters — frozen embeddings, norms and float head as well as the adapters — torch's FSDP2 shards over the
processes (each decoder block one unit, the rest the root; packed codes are buffers and stay whole on every
process): FSDP averages the gradients itself, the trained tensors are gathered whole into the checkpointed state
(:func:`full`), so the saved state is the same as a data-parallel run's and resumes with any count, sharded or not,
and :func:`gather_trained` copies them back into the model the process loaded, which is what is saved.

Started without a launcher (``WORLD_SIZE`` unset or 1) everything here is a no-op on one process.
"""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..device import launched
from ..errors import LowbitError
from ..models import decoder_blocks

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without torch.distributed: nothing is ever sharded
    DTensor = ()


@dataclass(frozen=True)
class Processes:
    """This process's place among the data-parallel processes."""

    index: int = 0
    count: int = 1

    @property
    def main(self) -> bool:
        """The one process that writes checkpoints, logs and results."""
        return self.index == 0


def main_process() -> bool:
    """Whether this is the process that prints and writes (rank 0, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def processes(device: torch.device) -> Processes:
    """This process's place, initialising the process group through accelerate on first use (gloo for ``cpu``,
    NCCL for ``cuda``); ``Processes(0, 1)`` when not launched."""
    if not launched():
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    return Processes(state.process_index, state.num_processes)


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
    """Replace every tensor by its mean over the processes (one flat all-reduce); no-op on one process. Sharded
    tensors (FSDP's gradients, already averaged) are left alone."""
    tensors = [t for t in tensors if not isinstance(t, DTensor)]
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
        if not isinstance(t, DTensor):  # a shard is this process's own (the copy was sharded after a broadcast)
            torch.distributed.broadcast(t.data, src=0)


def barrier(procs: Processes) -> None:
    """Wait for every process (e.g. until the main one has written or removed a folder)."""
    if procs.count > 1:
        torch.distributed.barrier()


def finish(procs: Processes) -> None:
    """Close the process group (gloo aborts at exit otherwise)."""
    if procs.count > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fsdp_shard(model: nn.Module, procs: Processes, device: torch.device, loss: Callable) -> nn.Module:
    """A copy of ``model`` on ``device`` whose float parameters FSDP2 shards over the processes: each decoder block
    one unit (gathered for its forward and backward, then freed), embeddings, final norm and head (tied or not) the
    root's. Packed codes and scales are buffers and stay whole. The copy's ``lowbit_loss(...)`` is
    ``loss(copy, ...)`` run as an FSDP forward (the training loss calls the decoder and then the head chunk by
    chunk, not the model's own forward). Broadcast the trained parameters before: every process must shard the
    same values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    sharded = copy.deepcopy(model).to(device)
    mesh = init_device_mesh(device.type, (procs.count,))
    for block in decoder_blocks(sharded)[1]:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sharded.lowbit_loss = types.MethodType(loss, sharded)
    register_fsdp_forward_method(sharded, "lowbit_loss")
    return sharded


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (gathered from every process: all of them must call this, in the same order),
    or ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as ``param`` is: this process's shard of it where ``param`` is sharded."""
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


@torch.no_grad()
def gather_trained(sharded: nn.Module, model: nn.Module) -> None:
    """Copy the trained parameters of :func:`fsdp_shard`'s copy back into ``model`` (every process calls this)."""
    own = dict(model.named_parameters())
    for name, p in sharded.named_parameters():
        if p.requires_grad:
            own[name].copy_(full(p).to(own[name].device))
