"""A flow run that a Prefect worker or ``serve`` started (no qarm command around it) keeps Prefect's
SIGTERM bridge, and still ends when that bridge's exception is lost where the signal landed."""

import contextlib
import os
import signal
import sys

import pytest

from qarm_core.errors import stop_requested
from qarm_core.progress import Progress
from tasks.common import flow_stop_signals


class Collected:
    """An object whose ``__del__`` receives a SIGTERM (a UI cancel): Prefect's handler runs inside it,
    and its TerminationSignal is only printed ("Exception ignored in ...")."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)


def _long_work(went_on: list[str]) -> None:
    """Three units of long work with a progress tick each: where a recorded stop is raised."""
    with Progress("test", "units", 3, emit=lambda line: None) as prog:
        for _ in range(3):
            prog.advance()
            went_on.append("a unit")


def _served(where: str, recorded: bool = True, then_fail: bool = False):
    """A flow (as a worker runs it) whose SIGTERM's exception is lost, then long work in the flow's
    body or in a task; ``then_fail``: the body fails with an error of its own instead (a stop that a
    library turned into another error, like DuckDB's "Query interrupted")."""
    from prefect import flow, task

    went_on: list[str] = []

    @task(name="served-stop-task")
    def work_task() -> None:
        _long_work(went_on)

    @flow(name=f"served-stop-{where}")
    def served() -> str:
        bridge = signal.getsignal(signal.SIGTERM)
        assert bridge.__module__ == "prefect.utilities.engine"       # Prefect's bridge, armed by the engine
        with flow_stop_signals() if recorded else contextlib.nullcontext():
            assert signal.getsignal(signal.SIGTERM) is bridge          # kept: it tells a cancel from a crash
            Collected()
            went_on.append("past the signal")
            if then_fail:
                raise RuntimeError("Query interrupted")
            work_task() if where == "task" else _long_work(went_on)
        return "published"

    return served, went_on


@contextlib.contextmanager
def _process_handlers():
    """The process's own SIGTERM handler (which Prefect's bridge passes an unhandled termination on
    to), recording instead of dying; and the exceptions the interpreter could only print."""
    passed_on, lost = [], []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: passed_on.append(signum))
    hook, sys.unraisablehook = sys.unraisablehook, lambda u: lost.append(u.exc_type.__name__)
    try:
        yield passed_on, lost
    finally:
        sys.unraisablehook = hook
        signal.signal(signal.SIGTERM, old)


def _call(served):
    try:
        return served(return_state=True)
    except BaseException as exc:        # noqa: BLE001 -- the engine re-raises a termination
        return exc


def _last_state(flow_name: str) -> str:
    """The state type of the newest run of the flow ``flow_name`` on the test's Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                       sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    return run.state.type.value


@pytest.mark.parametrize("where", ["flow", "task"])
def test_a_served_run_whose_termination_signal_is_lost_ends_at_the_next_tick(prefect_harness, where):
    """With ``flow_stop_signals`` the run ends at the next progress tick, in the flow's body or in a
    task, with Prefect's own TerminationSignal: no cancel was asked, so the engine marks it crashed
    and passes the signal on to the process's handler, as for a TerminationSignal that was not lost.
    The stops are forgotten when the flow's block ends."""
    from prefect.exceptions import TerminationSignal

    served, went_on = _served(where)
    with _process_handlers() as (passed_on, lost):
        got = _call(served)
    assert [x for x in lost if x == "TerminationSignal"] == ["TerminationSignal"]
    assert went_on == ["past the signal"], went_on
    assert isinstance(got, TerminationSignal) and got.signal == signal.SIGTERM    # re-raised by the engine
    assert _last_state(f"served-stop-{where}") == "CRASHED"
    assert passed_on == [signal.SIGTERM]
    assert stop_requested() is None


def test_without_the_recording_the_same_run_goes_on_and_completes(prefect_harness):
    """The negative case: without ``flow_stop_signals`` the lost exception leaves no trace."""
    served, went_on = _served("flow", recorded=False)
    with _process_handlers() as (passed_on, lost):
        got = _call(served)
    assert "TerminationSignal" in lost
    assert went_on == ["past the signal"] + ["a unit"] * 3 and got.is_completed() and passed_on == []
    assert _last_state("served-stop-flow") == "COMPLETED"


def test_a_lost_cancel_ends_the_run_cancelled(prefect_harness, monkeypatch):
    """A UI cancel: the runner marks its intent before it sends SIGTERM (stood in for by the engine's
    intent lookup); the recovered stop reaches the engine's cancel branch and the run is CANCELLED."""
    import prefect.flow_engine

    monkeypatch.setattr(prefect.flow_engine, "_termination_intent", lambda: "cancel")
    served, went_on = _served("cancel")
    with _process_handlers():
        _call(served)
    assert went_on == ["past the signal"]
    assert _last_state("served-stop-cancel") == "CANCELLED"


def test_a_stop_that_became_another_error_is_raised_as_the_stop(prefect_harness):
    """A body that fails with its own error after a stop was recorded (DuckDB turns a signal into
    RuntimeError("Query interrupted")) ends as the stop, not as a failure of that error."""
    from prefect.exceptions import TerminationSignal

    served, _ = _served("error", then_fail=True)
    with _process_handlers() as (passed_on, _lost):
        got = _call(served)
    assert isinstance(got, TerminationSignal), repr(got)
    assert isinstance(got.__cause__, RuntimeError) and "Query interrupted" in str(got.__cause__)
    assert _last_state("served-stop-error") == "CRASHED" and passed_on == [signal.SIGTERM]
