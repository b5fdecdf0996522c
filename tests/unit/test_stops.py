"""A stop signal is recorded whatever Python handler has it, and ends long work at its next tick."""

import os
import signal
import sys

import pytest

from qarm_core.errors import Stopped, forget_stops, raise_if_stopped, record_stop_signals, stop_requested
from qarm_core.progress import Progress


@pytest.fixture
def no_stops():
    forget_stops()
    yield
    forget_stops()


class Lost(Exception):
    pass


def raising(signum, frame):
    raise Lost(signum)


class Collected:
    """An object whose ``__del__`` receives a SIGTERM: the handler runs inside it."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def unraisable(monkeypatch):
    """The exceptions the interpreter could only print ("Exception ignored in ...")."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    return seen


@pytest.fixture
def handler():
    """Install a handler for a signal for the test, restore the old one after."""
    installed = {}

    def install(sig, fn):
        installed.setdefault(sig, signal.signal(sig, fn))

    yield install
    for sig, old in installed.items():
        signal.signal(sig, old)


def test_a_sigterm_whose_exception_is_lost_in_a_del_is_recorded(no_stops, handler, unraisable):
    """Prefect's SIGTERM bridge raises from its handler; landing in a ``__del__`` the exception is only
    printed ("Exception ignored in"). The stop is recorded all the same, and raised at the next check."""
    handler(signal.SIGTERM, raising)
    with record_stop_signals():
        Collected()
        assert unraisable == [Lost]
        assert stop_requested() == "SIGTERM"
        with pytest.raises(Stopped) as ei:
            raise_if_stopped()
    assert ei.value.signal == signal.SIGTERM
    assert stop_requested() == "SIGTERM"                  # still known after the block (the command's exit)


def test_without_the_recorder_such_a_stop_is_lost(no_stops, handler, unraisable):
    """The negative case: the same lost exception leaves no trace outside ``record_stop_signals``."""
    handler(signal.SIGTERM, raising)
    Collected()
    assert unraisable == [Lost] and stop_requested() is None
    raise_if_stopped()


def test_the_recording_block_chooses_what_a_recorded_stop_raises(no_stops, handler, unraisable):
    """A served flow run records with Prefect's exception (``raise_as``), so that Prefect's engine
    handles a recovered stop as it handles its own; an inner block's choice holds inside it only."""
    class EngineSignal(BaseException):
        def __init__(self, signal):
            self.signal = signal

    handler(signal.SIGTERM, raising)
    with record_stop_signals(EngineSignal):
        Collected()
        with pytest.raises(EngineSignal) as ei:
            raise_if_stopped()
        assert ei.value.signal == signal.SIGTERM
        with record_stop_signals():
            with pytest.raises(Stopped):
                raise_if_stopped()
        with pytest.raises(EngineSignal):
            raise_if_stopped()
    with pytest.raises(Stopped):                          # no block: the default
        raise_if_stopped()


def test_other_signals_are_not_stops_and_the_order_is_kept(no_stops, handler):
    seen = []
    for sig in (signal.SIGUSR2, signal.SIGHUP, signal.SIGINT):
        handler(sig, lambda signum, frame: seen.append(signum))
    with record_stop_signals():
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop_requested() is None                   # a handled signal, but not a stop
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop_requested() == "SIGHUP"               # the first stop names the run's end
    assert seen == [signal.SIGUSR2, signal.SIGHUP, signal.SIGINT]


def test_the_recorder_restores_the_previous_wakeup_fd(no_stops):
    r, w = os.pipe()
    os.set_blocking(w, False)
    before = signal.set_wakeup_fd(w)
    try:
        with record_stop_signals():
            ours = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(ours)
            assert ours not in (w, -1)
            with record_stop_signals():                   # nested: each restores what it found
                assert signal.set_wakeup_fd(signal.set_wakeup_fd(-1)) not in (w, ours)
            assert signal.set_wakeup_fd(ours) == ours
        assert signal.set_wakeup_fd(w) == w
    finally:
        signal.set_wakeup_fd(before)
        os.close(r)
        os.close(w)


def test_a_recorded_stop_ends_long_work_at_its_next_progress_tick(no_stops, handler):
    handler(signal.SIGTERM, lambda signum, frame: None)     # a handler that neither raises nor records
    done = []
    with record_stop_signals():
        with pytest.raises(Stopped):
            with Progress("test", "units", 10, emit=lambda line: None) as prog:
                for i in range(10):
                    if i == 3:
                        os.kill(os.getpid(), signal.SIGTERM)
                    prog.advance()
                    done.append(i)
    assert done == [0, 1, 2]


def _frame_in(module: str, fn):
    """Run ``fn(frame)`` from inside a function whose module is ``module`` (as a library's frame)."""
    scope = {"__name__": module}
    exec("import sys\ndef call(fn):\n    return fn(sys._getframe())\n", scope)
    return scope["call"](fn)


@pytest.mark.parametrize("module, expected", [
    ("sqlalchemy.engine.base", False),       # a transaction may be open
    ("mlflow.store.tracking", False),
    ("logging", False),                      # a handler's lock
    ("threading", False),
    ("prefect.task_engine", False),
    ("numpy.core", True),                    # compute, then our code (this test module)
    ("torch.nn.modules", True),
    ("qarm_core.quantize", True),
])
def test_a_stop_is_raised_at_once_only_in_our_code_or_compute_libraries(module, expected):
    from qarm_core.errors import interruptible_at

    assert _frame_in(module, interruptible_at) is expected


def test_library_frames_between_compute_and_our_code_defer_the_stop():
    from qarm_core.errors import interruptible_at

    # numpy called by sqlalchemy: the transaction is further out, still deferred
    lib = {"__name__": "sqlalchemy.orm.fake"}
    compute = {"__name__": "numpy.linalg.fake"}
    exec("import sys\ndef inner(fn):\n    return fn(sys._getframe())\n", compute)
    exec("def outer(fn):\n    return inner(fn)\n", lib)
    lib["inner"] = compute["inner"]
    assert lib["outer"](interruptible_at) is False
    assert compute["inner"](interruptible_at) is True      # numpy called from here: our code next
    assert interruptible_at(None) is False


def test_our_logging_handler_called_by_a_library_defers_the_stop():
    """Our logging handlers and filters run wherever a record was logged, a library's transaction too."""
    from qarm_core.errors import interruptible_at

    scope = {"__name__": "logging"}
    exec("def handle(fn):\n    return fn()\n", scope)
    assert scope["handle"](lambda: interruptible_at(sys._getframe())) is False
    assert (lambda: interruptible_at(sys._getframe()))() is True
