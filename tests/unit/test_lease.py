"""The refresh lease: one holder at a time, takeover of stale or dead holders, waiting, heartbeats."""

import json
import subprocess
import sys
import threading
import time

import pytest

from qarm_core.lease import LEASE_FILE, BusyError, Lease, LeaseLost


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
    first = Lease(tmp_path, "codebook-refresh").acquire()
    first.annotate("run-1")
    with pytest.raises(BusyError, match=r"in use by another codebook-refresh \(pid \d+ on .*MLflow run run-1\)"):
        Lease(tmp_path, "codebook-refresh").acquire()
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    second = Lease(tmp_path, "codebook-refresh").acquire()
    assert second.taken_over is None
    second.release()


def test_a_waiting_run_gets_the_lease_when_the_holder_finishes(tmp_path):
    first = Lease(tmp_path, "a").acquire()
    threading.Timer(0.5, first.release).start()
    t0 = time.monotonic()
    second = Lease(tmp_path, "b").acquire(wait_s=10, poll_s=0.05)
    assert 0.4 < time.monotonic() - t0 < 5 and second.holder().purpose == "b"
    second.release()
    third = Lease(tmp_path, "c").acquire()
    with pytest.raises(BusyError):
        Lease(tmp_path, "d").acquire(wait_s=0.3, poll_s=0.05)
    third.release()


def test_a_stale_heartbeat_is_taken_over_and_the_stalled_holder_learns_it(tmp_path):
    now = [1000.0]
    stalled = Lease(tmp_path, "a", ttl_s=60, heartbeat_s=10, clock=lambda: now[0]).acquire()
    stalled._stop.set()                            # frozen: no more heartbeats
    now[0] += 30
    with pytest.raises(BusyError):                 # not stale yet
        Lease(tmp_path, "b", ttl_s=60, heartbeat_s=10, clock=lambda: now[0]).acquire()
    now[0] += 31
    fresh = Lease(tmp_path, "b", ttl_s=60, heartbeat_s=10, clock=lambda: now[0]).acquire()
    assert fresh.taken_over.owner == stalled.owner
    with pytest.raises(LeaseLost, match="taken over"):
        stalled.check()
    stalled.release()                              # does not remove the new holder's lease
    assert fresh.holder().owner == fresh.owner
    fresh.check()
    fresh.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LEASE_FILE).write_text(json.dumps({
        "owner": "x", "pid": pid, "host": socket.gethostname(), "purpose": "codebook-refresh",
        "acquired_at": time.time(), "heartbeat_at": time.time(), "run_id": "run-dead"}))
    lease = Lease(tmp_path, "codebook-refresh").acquire()
    assert (lease.taken_over.pid, lease.taken_over.run_id) == (pid, "run-dead")
    lease.release()


def test_heartbeats_keep_a_long_run_alive(tmp_path):
    now = [0.0]
    lease = Lease(tmp_path, "a", ttl_s=60, heartbeat_s=10, clock=lambda: now[0]).acquire()
    for _ in range(10):                            # ten minutes of a run that beats every 20 s
        now[0] += 20
        lease.renew()
        with pytest.raises(BusyError):
            Lease(tmp_path, "b", ttl_s=60, heartbeat_s=10, clock=lambda: now[0]).acquire()
    lease.release()
    with pytest.raises(ValueError, match="heartbeat_s"):
        Lease(tmp_path, "a", ttl_s=10, heartbeat_s=10)
