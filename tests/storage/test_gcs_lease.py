"""The workdir lock on a bucket (the emulator of conftest.py): a lease renewed by its holder,
refused to a second run while live, taken over once expired."""
import json
import os
import time

import pytest
from etils import epath

from mage_jax import workdir_lock
from mage_jax.workdir_lock import LOCK_NAME, WorkdirInUseError, WorkdirLock


@pytest.fixture
def workdir(gcs, monkeypatch, request):
    monkeypatch.setattr(workdir_lock, "SETTLE_SECONDS", 0.05)
    return f"{gcs.create_bucket('leases')}/{request.node.name}"


def _lease(workdir) -> dict:
    return json.loads(epath.Path(workdir, LOCK_NAME).read_text())


def test_live_lease_refuses_a_second_run_until_released(workdir):
    with WorkdirLock(workdir):
        held = _lease(workdir)
        assert held["pid"] == os.getpid() and held["heartbeat"] > time.time() - 60
        with pytest.raises(WorkdirInUseError, match=rf"{workdir} is in use by a run that "
                           rf"renewed its lease \d+ s ago \(pid {os.getpid()} on "):
            WorkdirLock(workdir).acquire()
    assert not epath.Path(workdir, LOCK_NAME).exists()  # released: removed
    WorkdirLock(workdir).acquire().release()


def test_expired_lease_is_taken_over_and_a_fresh_one_is_not(workdir):
    limit = workdir_lock.LEASE_SECONDS + workdir_lock.MAX_CLOCK_SKEW_SECONDS
    killed = {"holder": "killed-run", "pid": 1, "host": "worker-0", "started": "earlier",
              "heartbeat": time.time() - limit + 30}  # silent, but not yet for long enough
    epath.Path(workdir, LOCK_NAME).write_text(json.dumps(killed))
    with pytest.raises(WorkdirInUseError, match=r"pid 1 on worker-0.*wait \d+ s"):
        WorkdirLock(workdir).acquire()
    killed["heartbeat"] = time.time() - limit - 1  # past the lease and the clock-skew margin
    epath.Path(workdir, LOCK_NAME).write_text(json.dumps(killed))
    lock = WorkdirLock(workdir).acquire()
    assert _lease(workdir)["pid"] == os.getpid()
    lock.release()


def test_holder_renews_its_lease(workdir, monkeypatch):
    monkeypatch.setattr(workdir_lock, "RENEW_SECONDS", 0.2)
    with WorkdirLock(workdir):
        first = _lease(workdir)["heartbeat"]
        deadline = time.time() + 20
        while _lease(workdir)["heartbeat"] == first:
            assert time.time() < deadline, "the lease was not renewed"
            time.sleep(0.1)


def test_a_run_whose_lease_was_taken_over_stops_at_its_next_step(workdir, monkeypatch):
    """Another run took the lease (this one was silent too long): the renewing thread
    notices, and check_held, which the training loop calls at every step, stops this run
    with one message naming the new holder; a workdir never lost raises nothing."""
    monkeypatch.setattr(workdir_lock, "RENEW_SECONDS", 0.2)
    monkeypatch.setattr(workdir_lock, "_lost", {})
    with WorkdirLock(workdir):
        workdir_lock.check_held(workdir)  # held: nothing to say
        other = {"holder": "other-run", "pid": 4242, "host": "worker-7", "started": "now",
                 "heartbeat": time.time()}
        epath.Path(workdir, LOCK_NAME).write_text(json.dumps(other))
        deadline = time.time() + 20
        while workdir not in workdir_lock._lost:
            assert time.time() < deadline, "the takeover was not noticed"
            time.sleep(0.1)
        with pytest.raises(workdir_lock.LeaseLostError,
                           match=rf"lease on --workdir={workdir} was taken over by the run of "
                                 r"pid 4242 on worker-7.*stops here without writing more"):
            workdir_lock.check_held(workdir)
    assert _lease(workdir)["holder"] == "other-run"  # released without removing theirs
    workdir_lock.check_held(f"{workdir}-elsewhere")
