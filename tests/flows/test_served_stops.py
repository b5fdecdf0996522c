"""A flow run that a Prefect worker or ``serve`` started (no qarm command around it) keeps Prefect's
SIGTERM bridge, and still ends when that bridge's exception is lost where the signal landed."""

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


@pytest.mark.parametrize("recorded", [True, False], ids=["flow_stop_signals", "without it"])
def test_a_served_run_whose_termination_signal_is_lost_ends_at_the_next_tick(prefect_harness, recorded):
    """With ``flow_stop_signals`` the run ends at the next progress tick with Prefect's own
    TerminationSignal: the engine marks it crashed and passes the signal on to the process's handler,
    as for a TerminationSignal that was not lost. Without it (the negative case) the run goes on to
    the end and completes. The stops are forgotten when the flow's block ends."""
    import contextlib

    from prefect import flow
    from prefect.exceptions import TerminationSignal

    went_on, lost, passed_on = [], [], []

    @flow(name="served-stop")
    def served() -> str:
        bridge = signal.getsignal(signal.SIGTERM)
        assert bridge.__module__ == "prefect.utilities.engine"       # Prefect's bridge, armed by the engine
        with flow_stop_signals() if recorded else contextlib.nullcontext():
            assert signal.getsignal(signal.SIGTERM) is bridge          # kept: it tells a cancel from a crash
            Collected()
            went_on.append("past the signal")
            with Progress("test", "units", 3, emit=lambda line: None) as prog:
                for _ in range(3):
                    prog.advance()
                    went_on.append("a unit")
        return "published"

    # the process's own handler, which Prefect's bridge passes an unhandled termination on to
    old = signal.signal(signal.SIGTERM, lambda signum, frame: passed_on.append(signum))
    hook, sys.unraisablehook = sys.unraisablehook, lambda u: lost.append(u.exc_type.__name__)
    try:
        state = served(return_state=True)
    except BaseException as exc:        # noqa: BLE001 -- which one the engine re-raises is its business
        state = exc
    finally:
        sys.unraisablehook = hook
        signal.signal(signal.SIGTERM, old)
    assert lost == ["TerminationSignal"]
    if not recorded:
        assert went_on == ["past the signal"] + ["a unit"] * 3 and state.is_completed() and passed_on == []
        assert _last_state("served-stop") == "COMPLETED"
        return
    assert went_on == ["past the signal"], went_on
    assert isinstance(state, TerminationSignal) and state.signal == signal.SIGTERM   # the engine re-raised it
    assert _last_state("served-stop") == "CRASHED"            # no cancel intent here: a crash, as for any SIGTERM
    assert passed_on == [signal.SIGTERM]
    assert stop_requested() is None


def _last_state(flow_name: str) -> str:
    """The state type of the newest run of the flow ``flow_name`` on the test's Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                       sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    return run.state.type.value
