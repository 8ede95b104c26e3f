"""The extension's build lock: a build killed while it held torch's lock file must not hang every later load."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lowbit.kernels import build

fcntl = pytest.importorskip("fcntl", reason="flock is POSIX-only; elsewhere torch's lock file is the only guard")

# A loader inside the lock after torch created its lock file: ``hang`` stays there until it is killed (what a build
# killed halfway leaves), ``finish`` builds for two seconds and cleans up after itself.
LOADER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from lowbit.kernels.build import exclusive, TORCH_LOCK
    folder, mode = Path(sys.argv[1]), sys.argv[2]
    with exclusive(folder):
        os.close(os.open(folder / TORCH_LOCK, os.O_CREAT | os.O_EXCL))
        print("building", flush=True)
        time.sleep(600 if mode == "hang" else 2)
        os.remove(folder / TORCH_LOCK)
""")


def _loader(folder, mode: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", LOADER, str(folder), mode], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "building"
    return child


def test_a_lock_file_left_by_a_killed_build_is_removed_and_warned_about(tmp_path, caplog):
    folder = tmp_path / "lowbit_qgemv"
    child = _loader(folder, "hang")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert (folder / build.TORCH_LOCK).exists()  # what made torch's loader wait forever
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels.build"), build.exclusive(folder):
        assert not (folder / build.TORCH_LOCK).exists()
    assert "was killed" in caplog.text


def test_a_live_build_is_waited_for_and_its_lock_file_left_alone(tmp_path, caplog):
    folder = tmp_path / "lowbit_qgemv"
    child = _loader(folder, "finish")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels.build"), build.exclusive(folder):
        waited = time.monotonic() - start
        assert not (folder / build.TORCH_LOCK).exists()
    assert child.wait(timeout=60) == 0
    assert waited > 1.0  # entered only once the live build let go
    assert caplog.text == ""  # its lock file was its own to remove, not ours


def test_a_clean_folder_is_entered_without_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels.build"), build.exclusive(tmp_path / "new"):
        assert (tmp_path / "new").is_dir()
    assert caplog.text == ""
