"""The daily deployment on a real Prefect server: served under the config's name, scheduled, one run at a
time, rank-train's trigger registered, run on demand (a UI "Run"), and cancelled mid-run (a UI "Cancel")."""

import os
import sys

import httpx
import pytest

from qarm_core.storage import Storage
from tests.support.paths import REPO, TINY
from tests.support.stack import Services, http_ok, wait_for

pytestmark = pytest.mark.slow

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def served(prefect_harness, tmp_path_factory):
    """``deployments/serve.py`` on the tiny config, serving into a fresh home, on the session's test
    server (a real Prefect server in a subprocess; starting another costs ~15 s). Yields the API
    address, the deployments by name and the home."""
    from prefect.settings import PREFECT_API_URL

    tmp = tmp_path_factory.mktemp("served")
    api = str(PREFECT_API_URL.value())
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "QARM_HOME": str(tmp / "home"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    # Services.stop ends the processes' children too: flow runs that serve starts in sessions of
    # their own (the rank-train the automation starts after the refresh)
    services = Services(tmp / "logs")
    try:
        wait_for("the Prefect server", lambda: http_ok(f"{api}/health"), 120, every=1)
        services.start("serve", [sys.executable, str(REPO / "deployments" / "serve.py"), "--config", TINY],
                       env, cwd=REPO)

        def deployments():   # named after the config file; rank-train's trigger is the last thing made
            r = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=5).json()}
            a = httpx.post(f"{api}/automations/filter", json={}, timeout=5).json()
            return r if a and {"daily-tiny", "weekly-retrain-tiny", "rank-train-tiny"} <= set(r) else None
        yield {"api": api, "deployments": wait_for("the served deployments", deployments, 90, every=1),
               "home": tmp / "home", "logs": tmp / "logs"}
    finally:
        services.stop()


def _create_run(api: str, deployment_id: str, parameters: dict | None = None) -> dict:
    def created():
        # what the UI's "Run" button sends; the server may still be busy migrating/scheduling
        r = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run",
                       json={"parameters": parameters} if parameters else {}, timeout=10)
        return r.json() if r.status_code == 201 else None
    return wait_for("the flow run to be created", created, 60, every=1)


def _state(api: str, run_id: str, timeout: float = 5) -> str | None:
    """The run's state type; None when the server did not answer in ``timeout`` s (it answers late
    while a served run trains on the same 2 cores: the callers poll until their own deadline)."""
    try:
        r = httpx.get(f"{api}/flow_runs/{run_id}", timeout=timeout)
    except httpx.TimeoutException:
        return None
    return ((r.json() if r.status_code == 200 else {}).get("state") or {}).get("type")


def _serve_log(served) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(served["logs"].glob("*")))


def test_served_deployment_runs_on_demand(served):
    api, dep = served["api"], served["deployments"]["daily-tiny"]
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
    assert dep["tags"] == ["qarm", "codebook-refresh", "daily", "config:tiny"]
    assert dep["global_concurrency_limit"]["limit"] == 1
    assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    automations = httpx.post(f"{api}/automations/filter", json={}, timeout=5).json()
    assert [a["name"] for a in automations] == ["rank-train-tiny after a refresh"]
    run = _create_run(api, dep["id"])
    state = wait_for("the flow run", lambda: s if (s := _state(api, run["id"])) in FINAL else None, 240, every=1)
    assert state == "COMPLETED", _serve_log(served)
    cur = Storage(served["home"]).current()
    assert cur is not None and cur.manifest["datasets"]["interactions"]["rows"] == 800


def test_a_ui_cancel_ends_a_served_run_cleanly(served):
    """A UI "Cancel" (the run set to CANCELLING) of a daily run in its training stage: the runner's
    SIGTERM ends the run CANCELLED, nothing is published (CURRENT still names the last snapshot),
    the home's lease is released, and no MLflow run is left RUNNING. Training runs long here (a
    step budget far beyond the tiny config's), so the cancel lands while it trains."""
    from qarm_core.config import load_config
    from qarm_core.lease import LEASE_FILE
    from tasks import tracking

    api, dep, home = served["api"], served["deployments"]["daily-tiny"], served["home"]
    before = Storage(home).current()
    assert before is not None, "needs the snapshot of test_served_deployment_runs_on_demand"
    run = _create_run(api, dep["id"], {"overrides": {"embed.train.max_steps": 100000, "embed.train.checkpoint_every": 20}})
    wait_for("the run's training to write a checkpoint",
             lambda: any((home / "work" / "train").glob("*.run/**/checkpoints/*")) or _state(api, run["id"]) in FINAL,
             240, every=0.5)
    assert _state(api, run["id"], timeout=30) == "RUNNING", _serve_log(served)
    r = httpx.post(f"{api}/flow_runs/{run['id']}/set_state",                     # what the UI's "Cancel" sends
                   json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True}, timeout=10)
    assert r.status_code in (200, 201), r.text
    state = wait_for("the cancelled run to end", lambda: s if (s := _state(api, run["id"])) in FINAL else None,
                     120, every=0.5)
    assert state == "CANCELLED", _serve_log(served)
    assert Storage(home).current().snapshot_id == before.snapshot_id              # nothing published
    wait_for("the lease to be released", lambda: not (home / LEASE_FILE).exists(), 30, every=0.5)
    runs = tracking.runs_of(load_config(TINY, {"home": str(home)}).resolved())
    (parent,) = [r for r in runs if r["tags"].get("prefect.flow_run_id") == run["id"]]
    mine = [parent] + [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["run_id"]]
    assert any(r["name"] == "train" for r in mine), [r["name"] for r in mine]
    assert [(r["name"], r["status"]) for r in mine if r["status"] == "RUNNING"] == []
