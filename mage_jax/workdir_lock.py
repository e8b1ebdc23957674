"""One workdir, one run: a lock that lives exactly as long as the process holding it.

Local workdirs: ``fcntl.flock`` on ``<workdir>/.mage_jax.lock``: the kernel drops the lock
when the holder exits for any reason (``kill -9`` included), so a killed run never leaves a
stale lock, and a file that merely exists means nothing. The file records who holds it
(pid, host, start time, command) so that the second run can name the holder. With several
hosts only process 0 locks.

Bucket workdirs (``gs://...``) have no locks and no process a reader could see: there the
file is a *lease*, ``{"holder", "pid", "host", "command", "started", "heartbeat"}``, which
the holding run rewrites every ``RENEW_SECONDS`` from a background thread. Another run takes
it over only once the heartbeat is older than ``LEASE_SECONDS + MAX_CLOCK_SKEW_SECONDS`` on
its own clock (a killed run's workdir is free again after about six minutes). Clock skew:
the heartbeat is the holder's clock, the expiry test the reader's; a reader whose clock is
ahead by more than ``MAX_CLOCK_SKEW_SECONDS`` (60 s) could take a live lease. Cloud VMs keep
their clocks within milliseconds of each other (NTP), so 60 s is a wide margin. Two runs
starting within the same moment: each writes its lease, waits ``SETTLE_SECONDS`` and reads
it back; the store keeps the last write, so only its writer goes on (a run whose own read
and write lie further apart than that could still slip through; object generations would
close this, which epath does not expose). A run that finds its lease taken over (it was
silent for longer than the lease, e.g. a paused VM) stops at its next step without writing
anything more there: ``check_held`` in the training loop.
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
import threading
import time
import uuid

from absl import logging
from etils import epath

from mage_jax import paths

LOCK_NAME = ".mage_jax.lock"
LEASE_SECONDS = 300          # a bucket lease's life without renewal
RENEW_SECONDS = 60           # how often the holder renews it
MAX_CLOCK_SKEW_SECONDS = 60  # tolerated difference between two hosts' clocks
SETTLE_SECONDS = 2.0         # between writing a lease and reading it back


class WorkdirInUseError(ValueError):
    """Another live process holds the workdir."""


class LeaseLostError(WorkdirInUseError):
    """This run's lease on a bucket workdir was taken over by another run."""


# Workdirs whose lease this process held and lost, with what to tell the user. Set by the
# renewing thread; read by the training loop at every step (check_held).
_lost: dict[str, str] = {}


def check_held(workdir: str) -> None:
    """Raises LeaseLostError once this process's lease on ``workdir`` was taken over."""
    if workdir in _lost:
        raise LeaseLostError(_lost[workdir])


class WorkdirLock:
    """``with WorkdirLock(workdir): ...``; raises WorkdirInUseError if a live run holds it."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None
        self._created = False  # acquire() made the workdir
        self._lease: dict | None = None  # bucket workdirs: the lease this run holds
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> "WorkdirLock":
        if paths.is_remote(self.workdir):
            return self._acquire_lease()
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

    # ------------------------------------------------------------ bucket workdirs: a lease
    def _read_lease(self) -> dict | None:
        try:
            return json.loads(epath.Path(self.path).read_text())
        except Exception:  # noqa: BLE001 -- absent or half-written: nobody holds it
            return None

    def _acquire_lease(self) -> "WorkdirLock":
        from mage_jax import validation  # a missing bucket or credentials: named, with the fix
        validation.validate_workdir(self.workdir)
        held = self._read_lease()
        if held and time.time() - float(held.get("heartbeat", 0)) < (
                LEASE_SECONDS + MAX_CLOCK_SKEW_SECONDS):
            raise WorkdirInUseError(self._lease_message(held))
        lease = {"holder": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.datetime.now().isoformat(timespec="seconds"),
                 "command": " ".join(sys.argv)[:500], "heartbeat": time.time()}
        paths.write_text(self.path, json.dumps(lease))
        time.sleep(SETTLE_SECONDS)  # another run taking it at the same moment: last one wins
        now = self._read_lease()
        if not now or now.get("holder") != lease["holder"]:
            raise WorkdirInUseError(self._lease_message(now or {}))
        self._lease = lease
        self._stop_renewing.clear()
        self._renewer = threading.Thread(target=self._renew, daemon=True,
                                         name="workdir-lease")
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop_renewing.wait(RENEW_SECONDS):
            now = self._read_lease()
            if now is not None and now.get("holder") != self._lease["holder"]:
                _lost[self.workdir] = (
                    f"the lease on --workdir={self.workdir} was taken over by the run of pid "
                    f"{now.get('pid')} on {now.get('host')} (started {now.get('started')}): "
                    f"this run was silent for over {LEASE_SECONDS} s. It stops here without "
                    f"writing more, and that run owns the workdir; to go on with this one, stop "
                    f"that one and run this command again, or give another --workdir.")
                logging.error("%s", _lost[self.workdir])
                return
            try:
                self._lease["heartbeat"] = time.time()
                paths.write_text(self.path, json.dumps(self._lease))
            except Exception as e:  # noqa: BLE001 -- retried at the next renewal
                logging.warning("Could not renew the lease on %s: %s", self.workdir, e)

    def _lease_message(self, h: dict) -> str:
        age = time.time() - float(h.get("heartbeat", time.time()))
        free_in = LEASE_SECONDS + MAX_CLOCK_SKEW_SECONDS - age
        return (f"--workdir={self.workdir} is in use by a run that renewed its lease "
                f"{age:.0f} s ago (pid {h.get('pid')} on {h.get('host')}, started "
                f"{h.get('started')}: {h.get('command', '')}). Two runs in one workdir would "
                f"overwrite each other's checkpoints: stop it, or, if it was killed, wait "
                f"{max(free_in, 0):.0f} s for its lease to expire, or give another --workdir.")

    def _release_lease(self) -> None:
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        held = self._read_lease()
        if held and held.get("holder") == self._lease["holder"]:
            epath.Path(self.path).unlink(missing_ok=True)
        self._lease = None

    def release(self) -> None:
        if self._lease is not None:
            self._release_lease()
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
    """Every workdir: a local one is flock-ed, a bucket one leased."""
    return bool(workdir)
