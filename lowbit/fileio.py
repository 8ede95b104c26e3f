"""Reading and writing files so that nothing a user saved is ever lost or half-written, and no bad file becomes a
traceback: the one atomic-write helper for a file (:func:`atomic_write`) and one for a folder
(:func:`staged_folder`), both under a lock on the output's parent folder; the checks an output path gets before any
work (:func:`check_output`); text reading that names an undecodable file (:func:`read_text`); and the SHA-256 the
checkpoint manifest records.

How a folder is replaced (``staged_folder(path, force=True)`` over an existing ``path``): the new content is
written into the sibling ``.NAME.tmp-PID-HEX``, fsynced, then swapped with ``path`` in one ``renameat2(...,
RENAME_EXCHANGE)`` (Linux), so at every instant ``path`` holds the old folder or the new one; the old one, now
under the temporary name, is deleted afterwards. Where the exchange is not available the old folder is first
renamed to ``.NAME.old-PID-HEX``, and the next save to ``path`` puts it back if a crash left ``path`` missing.
Every save holds an exclusive ``flock`` on the parent folder from its first byte to the rename, so two lowbit
processes never write the same output at once; and whatever a killed process left (``.NAME.tmp-*``,
``.NAME.old-*``, ``.NAME.*.tmp``) is removed by the next save to the same name, under that lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import LowbitError

MARKER = ".lowbit"  # written into every folder lowbit stages; --force replaces only such a folder (or an empty one)
OWNED_FILES = ("lowbit.json", MARKER)  # a checkpoint saved before the marker existed has lowbit.json


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or undecodable file is a one-line :class:`LowbitError`
    naming it (``what`` says which file it is to the user, e.g. "calibration file")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") \
            from e
    except IsADirectoryError as e:
        raise LowbitError(f"{what} {path} is a folder; pass a file") from e
    except FileNotFoundError as e:
        raise LowbitError(f"{what} {path} does not exist; check the path") from e
    except OSError as e:
        raise LowbitError(f"{what} {path} cannot be read ({e.strerror}); check its permissions") from e


def finite(value):
    """``value`` (nested dicts, lists, tuples) with every NaN or infinity replaced by None: JSON has no NaN, and a
    bare ``NaN`` breaks strict parsers (``jq``, JavaScript, Go)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_text(value, **kwargs) -> str:
    """Strict JSON of ``value``: non-finite floats become null (:func:`finite`), never a bare ``NaN``."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def os_error_line(e: OSError) -> str:
    """One line for a file-system refusal (disk full, read-only, no permission, a path that vanished): what, where
    and what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "a file"
    fix = {errno.ENOSPC: "free some space or choose another output place",
           errno.EDQUOT: "free some space or choose another output place",
           errno.EROFS: "choose a writable output place", errno.EACCES: "check its permissions",
           errno.EPERM: "check its permissions"}.get(e.errno, "check the path")
    return f"{where}: {e.strerror or e}; {fix}"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_held = threading.local()  # parent folders this thread holds the lock of (a nested save must not wait for itself)


@contextlib.contextmanager
def parent_lock(path: Path):
    """Hold an exclusive ``flock`` on ``path``'s parent folder (created if missing) while the block runs. Re-entrant
    within a thread; released by the kernel if the process dies. A file system without ``flock`` (some network
    mounts) runs the block unlocked."""
    parent = Path(path).parent.resolve()
    parent.mkdir(parents=True, exist_ok=True)
    held = _held.__dict__.setdefault("parents", {})
    if held.get(parent):
        held[parent] += 1
        try:
            yield
        finally:
            held[parent] -= 1
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        held[parent] = 1
        try:
            yield
        finally:
            held[parent] = 0
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _siblings(path: Path, *patterns: str) -> list[Path]:
    return sorted({p for pattern in patterns for p in path.parent.glob(pattern)})


def clean_stale(path: Path) -> list[Path]:
    """Under :func:`parent_lock`: remove what dead saves to ``path`` left (staging folders, temp files, the old
    folder of an interrupted replace), first putting an old folder back if a crash left ``path`` missing.
    Returns what was removed. Nothing else can be writing these names while the lock is held."""
    path = Path(path)
    name = glob_escape(path.name)
    olds = _siblings(path, f".{name}.old-*")
    if olds and not os.path.lexists(path):
        os.rename(olds[-1], path)
        olds = olds[:-1]
    removed = [*_siblings(path, f".{name}.tmp-*", f".{name}.*.tmp"), *olds]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped (an output called ``run[1]`` must not match ``run1``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``path`` through a temporary file in the same folder, fsync it, give it ordinary permissions and
    rename it over ``path`` (folders created): a reader sees the old file or the new one, never half of one.
    ``content`` is text (UTF-8), bytes, or a function that writes the file at the path it is given."""
    path = Path(path)
    with parent_lock(path):
        clean_stale(path)
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
            _fsync_folder(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def owned(path: Path) -> bool:
    """Whether ``--force`` may replace the folder ``path``: one lowbit wrote (it holds ``.lowbit`` or
    ``lowbit.json``) or an empty one."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    return any((path / f).is_file() for f in OWNED_FILES) or not any(path.iterdir())


def _refuse_existing(path: Path, force: bool, appeared: bool = False) -> None:
    if os.path.lexists(path) and (not path.is_dir() or path.is_symlink()):
        raise LowbitError(f"{path} exists and is not a folder; choose another output path")
    if not path.exists():
        return
    if not force:
        when = "appeared while this run was working" if appeared else "already exists"
        raise LowbitError(f"output folder {path} {when}; choose another folder or pass --force (force=True) to "
                          "replace it")
    if not owned(path):
        raise LowbitError(f"output folder {path} holds files lowbit did not write: --force replaces only a lowbit "
                          "output or an empty folder; choose another --out or empty it yourself")


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot, so the caller falls back to two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_folder(tmp: Path, path: Path) -> None:
    """Put the folder ``tmp`` at ``path``, which exists: atomically where the system can (see the module)."""
    if _exchange(tmp, path):
        shutil.rmtree(tmp)  # the old folder, now under the temporary name
        return
    old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the existing folder back before reporting the failure
        raise
    shutil.rmtree(old)


@contextlib.contextmanager
def staged_folder(path: Path, force: bool = False):
    """Yield a temporary sibling folder to write into; on success it takes ``path``'s place (files fsynced first,
    ordinary permissions), on failure it is removed. It starts with an empty ``.lowbit`` marker file, which makes
    it a folder a later ``force`` save may replace.

    An existing ``path`` is refused unless ``force``, and even then unless lowbit wrote it or it is empty
    (:func:`owned`); it is checked when the save starts and again just before the rename (a folder that appeared
    meanwhile is not replaced without ``force``). The whole save holds :func:`parent_lock`; see the module for
    why a crash at any point leaves the old folder or the new one at ``path``."""
    path = Path(path)
    _refuse_existing(path, force)
    with parent_lock(path):
        if clean_stale(path):
            _refuse_existing(path, force)  # an interrupted replace may have put the old folder back
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            (tmp / MARKER).touch()  # empty: it adds no byte to a checkpoint's size
            yield tmp
            umask = _umask()
            for p in tmp.rglob("*"):  # flush file contents before the rename makes them visible
                if p.is_file():
                    p.chmod(0o666 & ~umask)  # safetensors writes 0600; a checkpoint is meant to be shared
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            _refuse_existing(path, force, appeared=True)
            if path.exists():
                _replace_folder(tmp, path)
            else:
                os.rename(tmp, path)
            _fsync_folder(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(path.anchor)


def check_output(out: str | Path, force: bool = False, need_bytes: int = 0, what: str = "--out",
                 kind: str = "folder") -> None:
    """Everything about an output path that can be known before any work: not the file system root, a mount point,
    the current folder or a folder above it; not below a file; a writable place with ``need_bytes`` free. ``kind``
    says what will be written there: a ``folder`` (replaced whole: an existing one only with ``force`` and only if
    lowbit wrote it or it is empty), a ``file`` (replaced atomically; must not be a folder) or files ``into`` a
    folder that may exist."""
    out = Path(out).expanduser()
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or os.path.ismount(resolved):
        raise LowbitError(f"{what} {out} is a file system root or mount point; name a new folder inside it")
    if resolved == cwd or resolved in cwd.parents:
        raise LowbitError(f"{what} {out} is the current folder or one above it; name a new folder instead")
    base = _nearest_existing(resolved)
    if base != resolved and not base.is_dir():
        raise LowbitError(f"{what} {out} lies below {base}, which is a file, not a folder; choose another path")
    if kind == "folder":
        _refuse_existing(out, force)
    elif kind == "file" and resolved.is_dir():
        raise LowbitError(f"{what} {out} is a folder; name a file")
    elif kind == "into" and resolved.exists() and not resolved.is_dir():
        raise LowbitError(f"{what} {out} exists and is not a folder; choose another path")
    where = base if base.is_dir() else base.parent
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise LowbitError(f"{what} {out}: cannot write in {where} ({e.strerror}); choose a writable place") from e
    free = shutil.disk_usage(where).free
    if need_bytes > free:
        raise LowbitError(f"{what} {out} needs about {need_bytes / 2**20:,.0f} MiB but {where} has "
                          f"{free / 2**20:,.0f} MiB free; free some space or choose another place")
