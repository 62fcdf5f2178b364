"""One writer per run directory: an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock``.

Two processes training into one run directory would delete each other's in-progress saves and
interleave their metrics. ``RunLock.acquire`` takes the lock before anything in the directory is
written and fails at once, naming the holder's pid and command, when another process holds it.
The kernel releases an flock when its holder exits, however it exits (SIGKILL included), so a
crashed run never leaves the directory locked. Readers (``moesaic eval``, ``generate``,
``report``) take no lock: every file they read is replaced atomically.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the directory is then not protected
    fcntl = None

__all__ = ["RunLock", "RunDirError", "LOCK_FILE"]

LOCK_FILE = ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (held by another process, or it already holds
    a run that a fresh start would overwrite); the message says what to do instead."""


class RunLock:
    """An exclusive lock on ``run_dir`` held by this process until ``release``."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock (a no-op when already held); raises ``RunDirError`` naming the holder."""
        if self._fd is not None or fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"run directory {self.path.parent} is in use by another process ({holder}); "
                f"wait for it to finish, stop it, or choose another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()}, started {stamp}: {command[:300]}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __del__(self) -> None:
        self.release()
