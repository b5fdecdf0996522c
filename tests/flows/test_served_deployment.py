"""The daily deployment on a real Prefect server: served under the config's name, scheduled, one run at a
time, rank-train's trigger registered, and run on demand (a UI "Run")."""

import os
import sys

import httpx
import pytest

from qarm_core.storage import Storage
from tests.support.paths import REPO, TINY
from tests.support.stack import Services, http_ok, wait_for

pytestmark = pytest.mark.slow


def test_served_deployment_runs_on_demand(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    # the session's test server (a real Prefect server in a subprocess; starting another costs ~15 s)
    api = str(PREFECT_API_URL.value())
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "QARM_HOME": str(tmp_path / "home"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    # Services.stop ends the processes' children too: flow runs that serve starts in sessions of
    # their own (the rank-train the automation starts after the refresh)
    services = Services(tmp_path / "logs")
    try:
        wait_for("the Prefect server", lambda: http_ok(f"{api}/health"), 120, every=1)
        services.start("serve", [sys.executable, str(REPO / "deployments" / "serve.py"), "--config", TINY],
                       env, cwd=REPO)

        def deployments():   # named after the config file; rank-train's trigger is the last thing made
            r = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=5).json()}
            a = httpx.post(f"{api}/automations/filter", json={}, timeout=5).json()
            return r if a and {"daily-tiny", "weekly-retrain-tiny", "rank-train-tiny"} <= set(r) else None
        dep = wait_for("the served deployments", deployments, 90, every=1)["daily-tiny"]
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
        assert dep["tags"] == ["qarm", "codebook-refresh", "daily", "config:tiny"]
        assert dep["global_concurrency_limit"]["limit"] == 1
        assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        automations = httpx.post(f"{api}/automations/filter", json={}, timeout=5).json()
        assert [a["name"] for a in automations] == ["rank-train-tiny after a refresh"]

        def created():
            # what the UI's "Run" button sends; the server may still be busy migrating/scheduling
            r = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={}, timeout=10)
            return r.json() if r.status_code == 201 else None
        run = wait_for("the flow run to be created", created, 60, every=1)

        def finished():
            r = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=5)
            state = ((r.json() if r.status_code == 200 else {}).get("state") or {}).get("type")
            return state if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None
        assert wait_for("the flow run", finished, 240, every=1) == "COMPLETED"
        cur = Storage(tmp_path / "home").current()
        assert cur is not None and cur.manifest["datasets"]["interactions"]["rows"] == 800
    finally:
        services.stop()
