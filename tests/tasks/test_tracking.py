"""MLflow calls run to their end on one thread of their own: a stop signal lands in the caller's wait."""

import signal
import sqlite3
import threading
import time

import pytest

from tasks import tracking


class Interrupted(BaseException):
    """What a stop signal's handler raises (as Prefect's TerminationSignal does: not an Exception)."""


def test_a_signal_during_a_waiting_mlflow_write_interrupts_the_caller_not_the_write(tiny_cfg):
    """While the store is locked by another connection (another run's write), a write waits. A
    signal then interrupts the caller at once, the write itself completes once the lock is free,
    and the next write goes through at once. Made in the caller's thread, the same write held the
    caller inside SQLite until SQLite gave up (20 s). Not reproduced here: a signal landing while
    the interrupted write itself holds the lock (what CI saw), which the same thread rule covers."""
    cfg = tiny_cfg
    client = tracking._client(cfg)
    run_id = client.create_run(tracking.experiment_id(cfg), run_name="locked").info.run_id
    db = str(cfg.tracking.tracking_uri).removeprefix("sqlite:///")

    other = sqlite3.connect(db, timeout=0.1, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")                      # the write lock, held by "another run"
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: (_ for _ in ()).throw(Interrupted()))
    timer = threading.Timer(0.3, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1))
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Interrupted):
            client.set_tag(run_id, "written", "yes")      # waits for the lock
        interrupted_after = time.monotonic() - t0
    finally:
        timer.cancel()
        timer.join()                                      # no SIGUSR1 after the old handler is back
        signal.signal(signal.SIGUSR1, old)
        time.sleep(0.5)
        other.rollback()                                  # the lock is free again
        other.close()
    assert interrupted_after < 2.0, interrupted_after
    t1 = time.monotonic()
    client.set_terminated(run_id, "FAILED")              # after the interrupted write, in order
    assert time.monotonic() - t1 < 5.0
    run = client.get_run(run_id)
    assert run.data.tags.get("written") == "yes" and run.info.status == "FAILED"


def test_a_recorded_stop_during_a_waiting_mlflow_call_ends_the_wait(tiny_cfg):
    """Under a qarm command a stop's handler only records the stop while the caller waits for an
    MLflow call (the wait is not an interruptible frame): the wait notices it and raises it, the
    call itself completes on its thread. A stop recorded before a call lets that call finish (the
    unwinding's own writes). Without the check the caller waited until SQLite gave up (20 s)."""
    from qarm_core.errors import Stopped, forget_stops, record_stop_signals

    cfg = tiny_cfg
    client = tracking._client(cfg)
    run_id = client.create_run(tracking.experiment_id(cfg), run_name="locked").info.run_id
    db = str(cfg.tracking.tracking_uri).removeprefix("sqlite:///")
    other = sqlite3.connect(db, timeout=0.1, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    old = signal.signal(signal.SIGHUP, lambda signum, frame: None)     # records, raises nothing
    timer = threading.Timer(0.3, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGHUP))
    try:
        with record_stop_signals():
            t0 = time.monotonic()
            timer.start()
            with pytest.raises(Stopped):
                client.set_tag(run_id, "written", "yes")
            stopped_after = time.monotonic() - t0
            other.rollback()                                               # the lock is free again
            client.set_terminated(run_id, "KILLED")                        # recorded before: finishes
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGHUP, old)
        forget_stops()
        other.close()
    assert stopped_after < 2.0, stopped_after
    run = client.get_run(run_id)
    assert run.data.tags.get("written") == "yes" and run.info.status == "KILLED"


def test_mlflow_calls_reject_what_the_client_does_not_have(tiny_cfg):
    with pytest.raises(AttributeError):
        tracking._client(tiny_cfg).no_such_method


LEFT_RUNNING = """
import signal, sqlite3, sys, threading, time
from qarm_core.config import load_config
from tasks import tracking

cfg = load_config(sys.argv[1], {"home": sys.argv[2]}).resolved()
client = tracking._client(cfg)
run_id = client.create_run(tracking.experiment_id(cfg), run_name="left").info.run_id
other = sqlite3.connect(str(cfg.tracking.tracking_uri).removeprefix("sqlite:///"), timeout=0.1)
other.execute("BEGIN IMMEDIATE")                  # held until this process ends
def stop(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGUSR1, stop)
threading.Timer(0.3, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)).start()
try:
    client.set_tag(run_id, "left", "running")     # waits for the lock; the caller is interrupted
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_a_call_left_running_by_an_interrupted_caller_does_not_hold_the_process_at_exit(tmp_path):
    """The MLflow thread is a daemon: a process whose caller was interrupted while its write waited
    on a locked store exits at once, not when SQLite gives up on the lock (20 s; a thread pool's
    worker is joined at exit)."""
    import subprocess
    import sys

    from tests.support.paths import REPO, TINY

    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", LEFT_RUNNING, TINY, str(tmp_path / "home")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 0 and "interrupted" in proc.stdout, proc.stdout + proc.stderr
    assert took < 15.0, took
