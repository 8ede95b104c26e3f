"""Writing files so that nothing a user saved is ever lost or half-written: the one atomic-write helper for a
file (:func:`atomic_write`) and one for a folder (:func:`staged_folder`), plus the SHA-256 the checkpoint
manifest records."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import LowbitError


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``path`` through a temporary file in the same folder, fsync it, give it ordinary permissions and
    rename it over ``path`` (folders created): a reader sees the old file or the new one, never half of one.
    ``content`` is text (UTF-8), bytes, or a function that writes the file at the path it is given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, (str, bytes)):
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        if callable(content):
            content(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged_folder(path: Path, force: bool = False):
    """Yield a temporary sibling folder to write into; on success it is renamed to ``path`` (files fsynced
    first, ordinary permissions), on failure removed. An existing ``path`` is refused unless ``force``, and is
    only deleted after the new folder is in place, so a failure never loses what was there."""
    path = Path(path)
    if path.exists() and not force:
        raise LowbitError(f"output folder {path} already exists; choose another folder or pass --force "
                          "(force=True) to replace it")
    if path.exists() and not path.is_dir():
        raise LowbitError(f"{path} exists and is not a folder; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        umask = _umask()
        for p in tmp.rglob("*"):  # flush file contents before the rename makes them visible
            if p.is_file():
                p.chmod(0o666 & ~umask)  # safetensors writes 0600; a checkpoint is meant to be shared
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # put the existing folder back before reporting the failure
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


