"""One workdir, one run: a lock that lives exactly as long as the process holding it.

``fcntl.flock`` on ``<workdir>/.mage_jax.lock``: the kernel drops the lock when the holder
exits for any reason (``kill -9`` included), so a killed run never leaves a stale lock, and
a file that merely exists means nothing. The file records who holds it (pid, host, start
time, command) so that the second run can name the holder. Only local paths are locked
(``gs://`` and other URLs have no such lock); with several hosts only process 0 locks.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys

LOCK_NAME = ".mage_jax.lock"


class WorkdirInUseError(ValueError):
    """Another live process holds the workdir."""


class WorkdirLock:
    """``with WorkdirLock(workdir): ...``; raises WorkdirInUseError if a live run holds it."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None
        self._created = False  # acquire() made the workdir

    def acquire(self) -> "WorkdirLock":
        self._created = not os.path.exists(self.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise WorkdirInUseError(self._held_message()) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _held_message(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                h = json.load(f)
            who = (f"pid {h['pid']} on {h['host']}, started {h['started']}: "
                   f"{h.get('command', '')}")
            stop = f"stop it (kill {h['pid']} on {h['host']})"
        except (OSError, ValueError, KeyError):
            who, stop = "a process that has not yet written its name", "stop it"
        return (f"--workdir={self.workdir} is in use by a live run ({who}). Two runs in one "
                f"workdir would overwrite each other's checkpoints: wait for it to end, {stop}, "
                f"or give another --workdir.")

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def release_and_remove_if_unused(self) -> None:
        """Releases the lock; a workdir that ``acquire`` created and nothing else wrote to
        (a run refused before it started) is removed again, so a mistake leaves no trace."""
        self.release()
        if not self._created:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)
            os.rmdir(self.workdir)  # only if empty

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lockable(workdir: str) -> bool:
    """Local paths only: object stores (``gs://...``) have no advisory locks."""
    return bool(workdir) and "://" not in workdir
