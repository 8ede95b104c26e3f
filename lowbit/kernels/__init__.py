"""The only package that computes with packed weights. ``qmatmul`` picks an implementation per call.

Implementations: ``reference`` (dequantize + F.linear; ground truth and fallback) and ``cpu-gemv``
(C++ decode GEMV, see :mod:`.cpu`), chosen automatically where it applies. ``LOWBIT_KERNEL=reference``
(or :func:`force`) pins the reference for debugging. :data:`calls` counts which implementation ran, so
benchmarks can print it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os

import torch

from ..qtensor import PackedWeight
from .cpu import qmatmul_cpu
from .cpu import supports as cpu_supports
from .reference import qmatmul_reference

log = logging.getLogger(__name__)
IMPLEMENTATIONS = ("auto", "reference")
calls: collections.Counter = collections.Counter()
_forced: list[str] = []


def _choice() -> str:
    choice = _forced[-1] if _forced else os.environ.get("LOWBIT_KERNEL", "auto")
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"LOWBIT_KERNEL={choice!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    return choice


@contextlib.contextmanager
def force(name: str):
    """Use ``reference`` (always) or ``auto`` (fastest that applies) inside the block."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"kernel {name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def qmatmul(x: torch.Tensor, qweight: PackedWeight) -> torch.Tensor:
    """``x (..., in)`` -> ``(..., out)`` = ``x @ Wᵀ`` for a packed ``W``."""
    if _choice() == "auto" and cpu_supports(x, qweight):
        calls["cpu-gemv"] += 1
        return qmatmul_cpu(x, qweight)
    calls["reference"] += 1
    return qmatmul_reference(x, qweight)


def prepare() -> str:
    """Build or load the compiled CPU kernel now (it is otherwise built on first use); returns what decode
    will run: ``cpu-gemv`` or ``reference``."""
    from .cpu import extension

    return "cpu-gemv" if _choice() == "auto" and extension() is not None else "reference"


def kernel_summary() -> str:
    """Which implementations ran since the last :func:`reset_counts`, e.g. ``cpu-gemv:4200 + reference:210``."""
    return " + ".join(f"{k}:{v}" for k, v in sorted(calls.items())) or "none"


def reset_counts() -> None:
    calls.clear()
