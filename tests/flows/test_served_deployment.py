"""The daily deployment on a real Prefect server: served, scheduled, and run on demand (a UI "Run")."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from qarm_core.storage import Storage
from tests.support.paths import REPO, TINY

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what, fn, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_served_deployment_runs_on_demand(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "QARM_HOME": str(tmp_path / "home"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    procs = []
    try:
        procs.append(subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def healthy():
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        _wait("the Prefect server", healthy, 120)
        procs.append(subprocess.Popen([sys.executable, str(REPO / "deployments" / "serve.py"), "--config", TINY],
                                      env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def deployment():
            r = httpx.post(f"{api}/deployments/filter", json={}, timeout=5).json()
            return next((d for d in r if d["name"] == "daily-ml100k"), None)
        dep = _wait("the served deployment", deployment, 90)
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]

        def created():
            # what the UI's "Run" button sends; the server may still be busy migrating/scheduling
            r = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={}, timeout=10)
            return r.json() if r.status_code == 201 else None
        run = _wait("the flow run to be created", created, 60)

        def finished():
            r = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=5)
            state = ((r.json() if r.status_code == 200 else {}).get("state") or {}).get("type")
            return state if state in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None
        assert _wait("the flow run", finished, 240) == "COMPLETED"
        cur = Storage(tmp_path / "home").current()
        assert cur is not None and cur.manifest["datasets"]["interactions"]["rows"] == 800
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
