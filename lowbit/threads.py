"""Thread count that follows the machine's load, so decode degrades gracefully on a shared machine.

A decode step runs a few hundred short parallel regions. When another CPU-bound process holds one of the cores,
every region waits at its barrier for the thread the scheduler parked (a time slice, milliseconds), and decode
with as many threads as cores falls to about a quarter of its quiet speed on 2 cores — while one thread keeps
running at full single-core speed. :class:`ThreadGovernor` (a forward pre-hook that :func:`adapt_threads`
installs on a loaded checkpoint) measures, at most every ``interval`` seconds, how many cores other processes
used since its last look (``/proc/stat`` busy time less this process's own CPU time) and sets torch's thread
count to the cores left, between 1 and the count it started with. Linux only (elsewhere it does nothing);
``LOWBIT_ADAPT_THREADS=0`` turns it off.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")
ENV = "LOWBIT_ADAPT_THREADS"


def busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait), or None off Linux."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def threads_for(others: float, cores: int, most: int) -> int:
    """Threads to run beside ``others`` cores' worth of other work: the cores left, rounded, within [1, most]."""
    return max(1, min(most, round(cores - others)))


class ThreadGovernor:
    """Callable as ``forward_pre_hook(module, args)``; see the module docstring."""

    def __init__(self, interval: float = 0.25, most: int | None = None):
        self.interval = interval
        self.most = most or torch.get_num_threads()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.last: tuple[float, float, float] | None = None  # wall time, machine busy seconds, own CPU seconds

    def __call__(self, module, args) -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last[0] < self.interval:
            return
        busy = busy_seconds()
        if busy is None:
            return
        own = time.process_time()
        if self.last is not None:
            wall, busy0, own0 = self.last
            others = max(0.0, (busy - busy0) - (own - own0)) / (now - wall)
            threads = threads_for(others, self.cores, self.most)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        self.last = (now, busy, own)


def adapt_threads(model: torch.nn.Module) -> ThreadGovernor | None:
    """Install a :class:`ThreadGovernor` on ``model`` (once; not when ``LOWBIT_ADAPT_THREADS=0`` or off Linux)."""
    if os.environ.get(ENV, "1") == "0" or busy_seconds() is None:
        return None
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, ThreadGovernor):
            return hook
    governor = ThreadGovernor()
    model.register_forward_pre_hook(governor)
    return governor
