"""One refresh at a time per ``QARM_HOME``: a lease with an owner, a heartbeat and stale-lease takeover.

The lease is a JSON file, ``<home>/.refresh.lease``: owner token, pid, host, what holds it, when it was
taken and its last heartbeat (and, once known, the holder's MLflow run id). Taking, renewing and
releasing it happen under an ``flock`` on ``<home>/.refresh.lease.lock`` (a short critical section),
so two processes never both believe they hold it. A lease is free when there is none, when its
heartbeat is older than ``ttl_s`` (its holder hung or its host died), or when its holder's pid is
gone on this host (a SIGKILLed refresh): a new run then takes it over and learns what the dead
holder left (``taken_over``: its MLflow run id, to be marked failed).

While held, a daemon thread renews the heartbeat every ``heartbeat_s``; if the lease was taken over
meanwhile (this process was frozen for longer than ``ttl_s``), ``check`` raises before the holder
publishes anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from qarm_core.errors import QarmError

LEASE_FILE = ".refresh.lease"


class BusyError(QarmError):
    """Another live run holds the lease of this home."""


class LeaseLost(QarmError):
    """This run's lease was taken over (it stalled for longer than the lease's ttl)."""


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    pid: int
    host: str
    purpose: str
    acquired_at: float
    heartbeat_at: float
    run_id: str = ""
    flow_run_id: str = ""

    def describe(self, now: float) -> str:
        return (f"{self.purpose} (pid {self.pid} on {self.host}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.acquired_at))} UTC, last heartbeat "
                f"{now - self.heartbeat_at:.0f} s ago{', MLflow run ' + self.run_id if self.run_id else ''})")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, someone else's
        return True
    return True


class Lease:
    """The refresh lease of ``home``; use ``acquire``/``release`` or as a context manager."""

    def __init__(self, home: str | Path, purpose: str, ttl_s: float = 120.0, heartbeat_s: float = 20.0,
                 clock: Callable[[], float] = time.time):
        if heartbeat_s >= ttl_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be shorter than ttl_s ({ttl_s})")
        self.home = Path(home)
        self.path = self.home / LEASE_FILE
        self.purpose, self.ttl_s, self.heartbeat_s, self.clock = purpose, ttl_s, heartbeat_s, clock
        self.owner = uuid.uuid4().hex
        self.taken_over: LeaseInfo | None = None     # the stale lease this run replaced, if any
        self._info: LeaseInfo | None = None
        self._stop = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ file access (under the flock)
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / (LEASE_FILE + ".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> LeaseInfo | None:
        try:
            return LeaseInfo(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):   # a torn or foreign file: treat as stale
            return LeaseInfo("?", -1, "?", "unreadable lease file", 0.0, 0.0)

    def _write(self, info: LeaseInfo) -> None:
        tmp = self.path.with_name(f"{LEASE_FILE}.{self.owner}.tmp")
        tmp.write_text(json.dumps(asdict(info)))
        os.replace(tmp, self.path)

    def _is_stale(self, info: LeaseInfo, now: float) -> bool:
        if now - info.heartbeat_at > self.ttl_s:
            return True
        return info.host == socket.gethostname() and not pid_alive(info.pid)

    # ------------------------------------------------------------ public
    def holder(self) -> LeaseInfo | None:
        """The current lease, whoever holds it (None when free)."""
        with self._locked():
            info = self._read()
        return None if info is None or self._is_stale(info, self.clock()) else info

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> "Lease":
        """Take the lease, waiting up to ``wait_s`` seconds for a live holder to finish; BusyError
        (naming the holder) when it is still held then."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._locked():
                now = self.clock()
                info = self._read()
                if info is None or self._is_stale(info, now):
                    self.taken_over = info
                    self._info = LeaseInfo(self.owner, os.getpid(), socket.gethostname(), self.purpose, now, now)
                    self._write(self._info)
                    break
            if time.monotonic() >= deadline:
                raise BusyError(f"{self.home} is in use by another {info.describe(now)}; this run stops before "
                                "doing anything. Wait for it, or set flow.on_busy: wait to queue behind it.")
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="qarm-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def annotate(self, run_id: str, flow_run_id: str = "") -> None:
        """Record the holder's MLflow run id and Prefect flow run id in the lease (so that a later
        run can close them if this one dies)."""
        with self._locked():
            if self._read_is_ours():
                self._info = LeaseInfo(**{**asdict(self._info), "run_id": run_id, "flow_run_id": flow_run_id})
                self._write(self._info)

    def _read_is_ours(self) -> bool:
        info = self._read()
        return info is not None and self._info is not None and info.owner == self.owner

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.renew()

    def renew(self) -> None:
        """One heartbeat (the thread does this every ``heartbeat_s``)."""
        with self._locked():
            if not self._read_is_ours():
                self._lost = True
                return
            self._info = LeaseInfo(**{**asdict(self._info), "heartbeat_at": self.clock()})
            self._write(self._info)

    def check(self) -> None:
        """Raise LeaseLost if another run took this lease over (call before publishing)."""
        with self._locked():
            if self._lost or not self._read_is_ours():
                self._lost = True
                raise LeaseLost(f"the refresh lease of {self.home} was taken over by another run while this one "
                                f"stalled for more than {self.ttl_s:.0f} s; nothing is published")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._locked():
            if self._read_is_ours():
                self.path.unlink()
        self._info = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
