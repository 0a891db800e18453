"""An exclusive, bounded-wait file lock for the kernel build (see :mod:`lightning_tiger.optim.build`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: nothing is built there (see build_cache.plan_build), so no BuildLock is ever taken
    fcntl = None  # type: ignore[assignment]

__all__ = ["BuildLock", "pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class BuildLock:
    """An exclusive ``flock`` on a lock file that is never deleted, with a bounded wait.

    The kernel releases the lock when its holder dies (however it dies), so a killed build never blocks the next
    one, and no process ever judges a lock stale and deletes it: there is no check-then-delete race between
    waiters. The holder writes its host, pid and start time into the file, for the message of a waiter that
    gives up.

    Args:
        path: the lock file (created if missing, left in place).
        timeout: seconds :meth:`acquire` waits for a live holder before giving up.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.held = False
        self.owner: dict | None = None  # the holder seen while waiting (None when unknown)
        self._fd: int | None = None

    def _read_owner(self, fd: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.owner = json.loads(os.pread(fd, 4096, 0).decode() or "null")

    def acquire(self) -> bool:
        """Take the lock; False after ``timeout`` seconds of a live holder (never blocks longer)."""
        if self.held:
            return True
        deadline = time.monotonic() + self.timeout
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    # polled rather than a blocking flock: a blocking call cannot be given a timeout
                    self._read_owner(fd)
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        return False
                    time.sleep(0.2)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "time": time.time()}).encode(), 0)
        except BaseException:
            os.close(fd)  # closing releases the lock too
            raise
        self._fd = fd
        self.held = True
        return True

    def release(self) -> None:
        """Release the lock (the file stays: deleting it would let two processes lock two different files)."""
        if not self.held or self._fd is None:
            return
        self.held = False
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock
