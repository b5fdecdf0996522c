"""Task options shared by every qarm task."""

from __future__ import annotations

import logging

from prefect.cache_policies import NO_CACHE

from qarm_core.errors import QarmError


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (IO, network) but never bad input or bad config: those fail alike
    on every attempt, and retrying them only delays the error the operator needs to see."""
    try:
        state.result()
    except QarmError:
        return False
    except Exception:
        return True
    return False


# Stage outputs are cached by qarm's storage on input fingerprints (work/<stage>/<key>), which
# survives crashes and process restarts; Prefect's own result cache is therefore switched off.
TASK_DEFAULTS = dict(cache_policy=NO_CACHE, retry_condition_fn=retry_unless_bad_input)


def route_core_logs() -> None:
    """Show what ``qarm_core`` logs (progress of long work: pairs judged, training steps, items
    embedded, k-means passes) where Prefect's run logs go: the console, and inside a flow run the
    run's log in the Prefect UI. Idempotent."""
    from prefect.logging.handlers import APILogHandler

    core = logging.getLogger("qarm_core")
    core.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in core.handlers):
        core.addHandler(APILogHandler())
