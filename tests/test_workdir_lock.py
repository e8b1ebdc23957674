"""One workdir, one run: a live holder refuses a second run by name; a killed one frees it."""
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from mage_jax.workdir_lock import LOCK_NAME, WorkdirInUseError, WorkdirLock, lockable

REPO = pathlib.Path(__file__).resolve().parents[1]

_HOLDER = """
import sys, time
from mage_jax.workdir_lock import WorkdirLock
lock = WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _start_holder(workdir):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_holder_refuses_a_second_run_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    workdir = tmp_path / "run"
    holder = _start_holder(workdir)
    try:
        with pytest.raises(WorkdirInUseError, match=rf"in use by a live run \(pid {holder.pid} "):
            WorkdirLock(str(workdir)).acquire()
        # The command line says the same in one line, exit status 2, and touches nothing.
        before = sorted(os.listdir(workdir))
        result = subprocess.run(
            [sys.executable, "-m", "mage_jax.main", "--config=configs/tokenizer.py:demo",
             f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=180)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert f"in use by a live run (pid {holder.pid}" in last and "another --workdir" in last
        assert sorted(os.listdir(workdir)) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The file is still there, but nobody holds it: the next run takes it.
    assert (workdir / LOCK_NAME).exists()
    with WorkdirLock(str(workdir)) as lock:
        assert f'"pid": {os.getpid()}' in (workdir / LOCK_NAME).read_text()
        with pytest.raises(WorkdirInUseError, match=f"pid {os.getpid()}"):
            WorkdirLock(str(workdir)).acquire()  # held by this process: refused too
    assert lock._fd is None
    WorkdirLock(str(workdir)).acquire().release()  # released on exit from the block


def test_every_workdir_is_locked():
    # Bucket workdirs hold a lease instead of a flock (tests/storage/test_gcs_lease.py).
    assert lockable("/tmp/run") and lockable("runs/a") and lockable("gs://bucket/run")
    assert not lockable("")


def test_a_refused_run_removes_the_workdir_it_created_and_nothing_else(tmp_path):
    fresh = tmp_path / "fresh"
    lock = WorkdirLock(str(fresh)).acquire()
    lock.release_and_remove_if_unused()
    assert not fresh.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    lock = WorkdirLock(str(existing)).acquire()
    lock.release_and_remove_if_unused()
    assert existing.is_dir()  # it was there before: kept
    used = tmp_path / "used"
    lock = WorkdirLock(str(used)).acquire()
    (used / "config.json").write_text("{}")
    lock.release_and_remove_if_unused()
    assert (used / "config.json").exists()  # something was written: kept
