"""Building lowbit's C++ extension once per machine, safely when several processes load it at once.

torch's loader guards its build folder with a lock *file* (``<folder>/lock``) that it deletes when done. A process
killed while it holds that file — a first build interrupted, a job stopped during the up-to-date check every load
runs — leaves it behind, and every later load on that machine waits on it forever, silently. lowbit takes an OS
lock (``flock``, which the kernel releases when its holder dies, however it dies) around the whole load: the
holder is the only lowbit process inside torch's loader, so a lock file it finds was left by a dead process and is
removed, with a warning. Where ``fcntl`` does not exist (Windows) torch's own lock file is the only guard.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)
TORCH_LOCK = "lock"  # the file torch.utils.cpp_extension creates (O_EXCL) in the build folder while it builds
FLOCK = "lowbit.flock"  # the file lowbit flocks beside it


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Holds ``folder``'s build lock (waiting for another live process's build to finish); on entry, removes a
    torch lock file that a killed process left there."""
    try:
        import fcntl
    except ImportError:  # no flock here: leave torch's lock file alone, it may belong to a live build
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / FLOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = folder / TORCH_LOCK
            if stale.exists():
                log.warning("removed %s, left by a build of lowbit's C++ kernels that was killed; "
                            "torch would have waited on it forever", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load(name: str, sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str]):
    """``torch.utils.cpp_extension.load`` of ``sources`` as module ``name``, built under :func:`exclusive`. Raises
    what the loader raises (no compiler, a compile error)."""
    from torch.utils import cpp_extension

    folder = Path(cpp_extension._get_build_directory(name, verbose=False))  # $TORCH_EXTENSIONS_DIR/<python>/name
    with exclusive(folder):
        return cpp_extension.load(name=name, sources=[str(p) for p in sources], extra_cflags=list(cflags),
                                  extra_ldflags=list(ldflags), build_directory=str(folder), verbose=False)
