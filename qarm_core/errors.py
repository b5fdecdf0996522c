"""Errors that name the stage, the dataset and what is wrong."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator


class QarmError(Exception):
    """Base class of every error qarm raises on purpose."""


class ConfigError(QarmError):
    """The pipeline config is unreadable, has unknown keys or wrong types."""


class StorageError(QarmError):
    """A snapshot or pointer in QARM_HOME is missing or inconsistent."""


class DataError(QarmError):
    """Input data of a stage is unusable.

    The message always starts with ``[stage=..., dataset=...]`` so that a failed Prefect run or a CLI
    error tells the operator where to look without reading a traceback.
    """

    def __init__(self, stage: str, dataset: str, problem: str):
        self.stage = stage
        self.dataset = dataset
        self.problem = problem
        super().__init__(f"[stage={stage}, dataset={dataset}] {problem}")


class GateError(DataError):
    """A data gate failed; ``failures`` holds one entry per failed expectation."""

    def __init__(self, stage: str, dataset: str, failures: list[dict]):
        self.failures = failures
        parts = []
        for f in failures:
            sample = f.get("sample")
            sample_txt = f", e.g. {sample}" if sample else ""
            parts.append(f"{f['expectation']}{_kwargs_txt(f.get('kwargs'))}: "
                         f"{f.get('unexpected_count', '?')} unexpected{sample_txt}")
        # One line (the CLI prints it as its one error line): the failures joined by " | "
        problem = f"gate failed, {len(failures)} expectation(s) not met: " + " | ".join(parts)
        super().__init__(stage, dataset, problem)


def _kwargs_txt(kwargs: dict | None) -> str:
    if not kwargs:
        return ""
    return "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"



STOPPED_BY = "stopped by "


class Stopped(KeyboardInterrupt):
    """A signal (SIGTERM, SIGINT, SIGHUP) asked a command to stop; a BaseException, so no handler
    swallows it. ``signal`` is the signal's number, as on Prefect's ``TerminationSignal``."""

    def __init__(self, signal: int):
        import signal as signal_mod

        self.signal = signal
        super().__init__(f"{STOPPED_BY}{signal_mod.Signals(signal).name}")


# Signals that asked this process to stop, in order. A stop can reach code that turns it into
# another error without a link back (DuckDB raises RuntimeError("Query interrupted") for a signal
# that lands during a query), so the command and the retry rule also ask here.
_STOPS: list[int] = []
# The read end of the pipe that ``record_stop_signals`` gives ``signal.set_wakeup_fd``; -1 when no
# command records. Why not only the command's handler: while a flow runs, Prefect's engine swaps in
# its own SIGTERM handler (``capture_sigterm``), whose ``TerminationSignal`` is lost where it lands
# in a ``__del__`` or a weakref callback ("Exception ignored in ..."): seen when a SIGTERM'd refresh
# ran on and published. The interpreter writes every handled signal's number to the wakeup fd in
# its C handler, before and whatever the Python handler is, so the stop is recorded all the same.
_WAKEUP_READ = -1
# Held while the pipe is read or closed: a watchdog thread reads it too (flows.cli), and a closed
# descriptor's number may be reused by the next file opened. Reentrant: a signal handler calling
# ``note_stop`` may run in the main thread while it holds the lock.
_WAKEUP_LOCK = threading.RLock()
# What ``raise_if_stopped`` raises for a recorded stop's signal number: ``Stopped``, or what the
# innermost ``record_stop_signals`` was given (a served flow run: Prefect's TerminationSignal).
_RAISE_AS: Callable[[int], BaseException] | None = None


@functools.cache
def stop_signals() -> frozenset[int]:
    """The signals that ask a command to stop: SIGTERM, SIGINT, SIGHUP."""
    import signal as signal_mod

    return frozenset({signal_mod.SIGTERM, signal_mod.SIGINT, signal_mod.SIGHUP})


def _drain_wakeup() -> None:
    """Move the stop signals the wakeup pipe holds into ``_STOPS`` (other signals are dropped)."""
    import os

    if _WAKEUP_READ < 0:
        return
    stops = stop_signals()
    with _WAKEUP_LOCK:
        while _WAKEUP_READ >= 0:
            try:
                data = os.read(_WAKEUP_READ, 512)
            except OSError:                 # BlockingIOError: nothing more (the pipe is non-blocking)
                return
            for signum in data:
                if signum in stops and signum not in _STOPS:
                    _STOPS.append(signum)
            if len(data) < 512:
                return


@contextlib.contextmanager
def record_stop_signals(raise_as: Callable[[int], BaseException] | None = None) -> Iterator[None]:
    """While the block runs (in the main thread), every SIGTERM, SIGINT or SIGHUP that reaches a
    Python-level handler, ours or any library's, is recorded for ``raise_if_stopped`` and
    ``stop_requested``, even where the exception that handler raises is swallowed. ``raise_as``: what
    ``raise_if_stopped`` raises in the block, given the signal's number (default ``Stopped``).
    Restores the previous wakeup fd on the way out. The wakeup fd is one per process: code that sets
    its own in the block (an asyncio loop's ``add_signal_handler`` in the main thread; nothing qarm
    runs does) ends the recording until it puts ours back."""
    import os
    import signal as signal_mod

    global _WAKEUP_READ, _RAISE_AS
    read, write = os.pipe()
    try:
        os.set_blocking(read, False)
        os.set_blocking(write, False)   # set_wakeup_fd requires it: a full pipe drops bytes, never blocks
        previous = signal_mod.set_wakeup_fd(write, warn_on_full_buffer=False)   # ValueError off the main thread
    except BaseException:
        os.close(read)
        os.close(write)
        raise
    outer, _WAKEUP_READ = _WAKEUP_READ, read
    outer_raise_as, _RAISE_AS = _RAISE_AS, raise_as
    try:
        yield
    finally:
        current = signal_mod.set_wakeup_fd(previous)
        if current != write:            # replaced meanwhile (an event loop's signal handlers): leave it
            signal_mod.set_wakeup_fd(current)
        with _WAKEUP_LOCK:
            _drain_wakeup()
            _WAKEUP_READ = outer
            _RAISE_AS = outer_raise_as
            os.close(read)
            os.close(write)


def recording_stops() -> bool:
    """Whether a ``record_stop_signals`` block is running."""
    return _WAKEUP_READ >= 0


# Where a stop's exception may be raised at once: in our own code, reached from the frame the signal
# landed in through frames of compute libraries only, which hold no lock or transaction across Python
# frames. Anywhere else (a database driver or ORM, an HTTP client, logging, threading, Prefect's
# engine) the exception could leave a transaction or lock held and the unwinding waiting on it: seen
# in CI, a SIGINT'd refresh hung in SQLite's commit while ending its MLflow stage run. There the
# handler only records the stop, and the next check raises it (a progress tick, a stage start).
OUR_PACKAGES = frozenset({"qarm_core", "tasks", "flows", "tests", "benchmarks", "__main__"})
COMPUTE_PACKAGES = frozenset({"numpy", "torch", "transformers", "tokenizers", "safetensors", "pyarrow", "duckdb",
                              "numba", "faiss", "pandas", "scipy", "json", "re", "pathlib", "posixpath",
                              "genericpath", "copy"})


def interruptible_at(frame: Any) -> bool:
    """Whether a stop's exception may be raised in ``frame`` (what a signal handler is given): walking
    outward from it, our own code is reached through ``COMPUTE_PACKAGES`` frames only, and that code
    is not a logging handler or filter of ours (``logging`` calls it from wherever a record was
    logged)."""
    def package(f: Any) -> str:
        return str(f.f_globals.get("__name__") or "").split(".", 1)[0]

    while frame is not None:
        top = package(frame)
        if top in OUR_PACKAGES:
            # our logging handler or filter, called by whatever logged (a library mid-transaction too)
            return frame.f_back is None or package(frame.f_back) != "logging"
        if top not in COMPUTE_PACKAGES:
            return False
        frame = frame.f_back
    return False


# The stop handler of the running command (flows.cli), the innermost last.
_COMMAND_HANDLERS: list[Callable[[int, Any], None]] = []


@contextlib.contextmanager
def command_stop_handler(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """While the block runs, ``reclaim_stop_signals`` puts ``handler`` back where a library replaced it."""
    _COMMAND_HANDLERS.append(handler)
    try:
        yield
    finally:
        _COMMAND_HANDLERS.remove(handler)


def command_running() -> bool:
    """Whether a command's stop handler is registered (``command_stop_handler``): a qarm CLI command
    runs in this process, as opposed to a flow run a Prefect worker or ``serve`` started."""
    return bool(_COMMAND_HANDLERS)


def reclaim_stop_signals() -> bool:
    """In a command's main thread: put its stop handler back on SIGTERM, SIGINT and SIGHUP where a
    library replaced it. Prefect's flow engine installs its own SIGTERM handler for a flow run
    (``capture_sigterm``), whose exception is raised wherever the signal lands; the command's raises
    only where ``interruptible_at`` allows, and Prefect restores it when the flow run ends. Without a
    command (a flow run a Prefect worker started) nothing changes: its cancellation needs Prefect's
    handler. Returns whether a handler was put back."""
    import signal as signal_mod

    if not _COMMAND_HANDLERS or threading.current_thread() is not threading.main_thread():
        return False
    handler = _COMMAND_HANDLERS[-1]
    changed = False
    for signum in sorted(stop_signals()):
        if signal_mod.getsignal(signum) is not handler:
            signal_mod.signal(signum, handler)
            changed = True
    return changed


def note_stop(signum: int) -> None:
    """Record that signal ``signum`` asked this process to stop."""
    _drain_wakeup()                     # keep the order in which the signals arrived
    if signum not in _STOPS:
        _STOPS.append(signum)


def forget_stops() -> None:
    """A new command starts: no stop asked yet."""
    _drain_wakeup()
    _STOPS.clear()


def raise_if_stopped() -> None:
    """Raise ``Stopped`` (or the recording block's ``raise_as``) if a signal asked this process to
    stop: a stage boundary's check, and each progress tick's (``qarm_core.progress``), for a signal
    whose exception was swallowed where it landed."""
    _drain_wakeup()
    if _STOPS:
        raise (_RAISE_AS or Stopped)(_STOPS[0])


def recorded_stops() -> tuple[int, ...]:
    """The numbers of the signals that asked this process to stop, in the order they came."""
    _drain_wakeup()
    return tuple(_STOPS)


def stop_requested() -> str | None:
    """The name of the first signal that asked this process to stop, or None."""
    import signal as signal_mod

    stops = recorded_stops()
    return signal_mod.Signals(stops[0]).name if stops else None


def stop_signal_name(exc: BaseException | None) -> str | None:
    """The name of the signal that stopped a run, if ``exc`` or an exception it was raised from or
    while handling carries an int ``signal`` (``Stopped``, Prefect's ``TerminationSignal``). Why the
    whole chain: a signal that lands while Prefect creates a task run makes Prefect's crash handler
    raise its own error ("Task run is not set") while handling the signal, and that error, not the
    signal, unwinds the flow.
    """
    import signal as signal_mod

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        sig = getattr(exc, "signal", None)
        if isinstance(sig, int) and not isinstance(sig, bool):
            try:
                return signal_mod.Signals(sig).name
            except ValueError:
                return f"signal {sig}"
        exc = exc.__cause__ or exc.__context__
    return None
