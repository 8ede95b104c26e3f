"""The one device choice (``--device auto|cpu|cuda[:N]``), decided here and passed down as a ``torch.device``.

``auto`` is the first CUDA GPU when torch sees one, else the CPU. A device that is not there is a
:class:`~lowbit.errors.LowbitError` naming it and the fallback (``--device cpu``), before any work starts.
"""

from __future__ import annotations

import os

import torch

from .errors import LowbitError

CPU = torch.device("cpu")

DEVICE_HELP = "auto (the first CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N."


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``spec`` → the device to compute on (see the module docstring)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return CPU
    kind, _, index = text.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise LowbitError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    number = int(index or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if number >= count:
        seen = "no CUDA GPU" if not count else f"{count} CUDA GPU{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})"
        raise LowbitError(f"device {kind}:{number} is not available: torch sees {seen} here; pass --device cpu "
                          "(or --device auto)")
    return torch.device("cuda", number)


def launched() -> bool:
    """Whether a launcher (accelerate, torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_device(device: torch.device) -> torch.device:
    """Where this process computes: under a launcher (:func:`launched`) a CUDA run puts process ``LOCAL_RANK`` on
    its own GPU (``cuda`` without an index); else ``device``."""
    if device.type != "cuda" or not launched():
        return device
    rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if rank >= count:
        raise LowbitError(f"process {rank} has no GPU of its own: this machine has {count}; pass --processes "
                          f"{count} or fewer (one per GPU), or --device cpu")
    return torch.device("cuda", rank)


def to_device(value, device: torch.device):
    """``value`` with every tensor in it (inside tuples, lists and dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
