"""The production topology with real components and no docker (issue 17, item 5).

Postgres from Debian's package on a free port; ``prefect server`` with its database in it; ``mlflow server``
with a Postgres backend store; a process worker. The deployments come from ``deployments/prefect.yaml``
(``prefect deploy --all``). The daily deployment runs on the tiny config through an override, over the API
(what ``prefect deployment run --param`` sends); then, in headless Chromium: the deployment page shows the
daily schedule, a custom run with an edited override is submitted through the UI's form (while the first
run holds the deployment's one slot, so it waits: ENQUEUE), rank-train runs after the refresh (the
automation), and MLflow's compare page shows the two refreshes' collision and AUC metrics. Screenshots
are kept in .cache/tests/stack-screenshots/, the services' logs in .cache/tests/stack-logs/.

Needs Debian's postgresql and chromium packages (`.ci/run` installs them): without them the test is
skipped, unless QARM_STACK_REQUIRED=1 (set by `.ci/run`, where it fails instead).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from qarm_core.storage import Storage
from tests.support.paths import REPO, TEST_CACHE, TINY
from tests.support.stack import (CHROMIUM_ARGS, QUIET, VENV_BIN, Postgres, Services, chromium_path,
                                 flow_run_state, flow_runs, http_ok, pg_bin, prefect_cli, start_mlflow_server,
                                 start_postgres, start_prefect_server, wait_finished, wait_for)

pytestmark = pytest.mark.slow

SCREENSHOTS = TEST_CACHE / "stack-screenshots"
LOGS = TEST_CACHE / "stack-logs"
DAILY, RANK = "daily-ml100k", "rank-train-ml100k"      # deployments/prefect.yaml: configs/ml100k.yaml
# The refresh's headline metrics on its MLflow parent run (tasks/tracking.py HEADLINE).
HEADLINE = ["quantize.raw.collision_rate", "quantize.resolved.collision_rate", "quantize.raw.decode_hr_at_1"]
# rank-train gets the refresh's overrides (the trigger passes them on): one model, one epoch, one seed.
FAST_RANK = {"rank.models": ["din"], "rank.train.epochs": 1, "rank.train.seeds": [0]}


@dataclass
class Stack:
    services: Services
    pg: Postgres
    api: str
    ui: str
    mlflow: str
    prefect_home: Path
    deployments: dict[str, dict]


def _missing() -> list[str]:
    need = {"PostgreSQL server binaries (apt-get install postgresql)": pg_bin("initdb") and pg_bin("postgres"),
            "Chromium (apt-get install chromium)": chromium_path(),
            "psycopg2 (pip install psycopg2-binary)": importlib.util.find_spec("psycopg2"),
            "playwright (pip install playwright)": importlib.util.find_spec("playwright")}
    return [what for what, ok in need.items() if not ok]


@pytest.fixture
def stack(tmp_path):
    missing = _missing()
    if missing:
        (pytest.fail if os.environ.get("QARM_STACK_REQUIRED") == "1" else pytest.skip)(
            "the stack test needs: " + "; ".join(missing))
    services = Services(tmp_path / "logs")
    env = {**os.environ, **QUIET}
    for k in ("MLFLOW_TRACKING_URI", "QARM_HOME", "PREFECT_API_URL", "PREFECT_PROFILE"):
        env.pop(k, None)
    try:
        pg = start_postgres(services, ["prefect", "mlflow"])
        api = start_prefect_server(services, pg, tmp_path / "prefect-server", env)
        ml = start_mlflow_server(services, pg, tmp_path / "mlartifacts", env)
        wait_for("the Prefect server", lambda: (services.check_alive(), http_ok(f"{api}/health"))[1], 180)
        client = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect-client"),
                  "QARM_REPO": str(REPO)}   # the pull step's working directory, resolved when deploying
        prefect_cli(["work-pool", "create", "qarm", "--type", "process"], client, REPO)
        services.start("worker", [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "qarm"],
                       {**client, "PREFECT_WORKER_QUERY_SECONDS": "1"}, cwd=tmp_path)
        prefect_cli(["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], client, REPO)
        wait_for("the MLflow server", lambda: (services.check_alive(), http_ok(f"{ml}/health"))[1], 180)
        deps = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()}
        yield Stack(services, pg, api, api.removesuffix("/api"), ml, tmp_path / "prefect-server", deps)
    finally:
        services.stop()
        shutil.rmtree(LOGS, ignore_errors=True)
        if services.logs.exists():
            shutil.copytree(services.logs, LOGS)


def _ts(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _past_scheduled(api: str, run_id: str) -> str | None:
    state = flow_run_state(api, run_id)
    return None if state in (None, "SCHEDULED") else state


def _state_names(api: str, run_id: str) -> list[str]:
    r = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run_id}, timeout=10)
    return [s["name"] for s in r.json()]


def _parent_run(client, experiment_id: str, flow_run_id: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent


def test_deploy_run_and_watch_the_stack(stack, tmp_path):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    t0 = time.monotonic()
    api, home, shots = stack.api, tmp_path / "home", tmp_path / "screenshots"
    print(f"\nscreenshots: {shots} (kept in {SCREENSHOTS}); service logs kept in {LOGS}")
    daily, rank = stack.deployments[DAILY], stack.deployments[RANK]
    assert {DAILY, "weekly-retrain-ml100k", RANK} == set(stack.deployments)
    assert daily["tags"] == ["qarm", "codebook-refresh", "daily", "config:ml100k"]
    assert daily["global_concurrency_limit"]["limit"] == 1
    assert daily["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    automations = httpx.post(f"{api}/automations/filter", json={}, timeout=10).json()
    assert [a["name"] for a in automations] == [f"{RANK} after a refresh"]

    overrides = {"embed.reuse_model": True, "quantize.mode": "warm_start", "home": str(home),
                 "tracking.tracking_uri": stack.mlflow, **FAST_RANK}
    params1 = {"config_path": TINY, "overrides": overrides}
    edited = {**overrides, "quantize.mode": "refit"}     # the custom run's change: the codebook refitted
    shots.mkdir(parents=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)

            def shot(name: str, full_page: bool = True) -> None:
                page.screenshot(path=shots / name, full_page=full_page, animations="disabled")

            # 1. The UI's custom-run form filled in first (the tiny config, the edited override), to be
            #    submitted while run 1 holds the deployment's one slot.
            page.goto(f"{stack.ui}/deployments/deployment/{daily['id']}/run")
            page.locator("textarea.p-textarea__control").first.fill(TINY)   # config_path
            page.locator("textarea.p-code-input__textarea").first.fill(json.dumps(edited, indent=2))   # overrides
            shot("1-custom-run-form.png")

            # 2. The daily deployment on the tiny config, an override, over the API (what `prefect
            #    deployment run --param` sends); once it holds the slot (Pending on; it runs 10 s or more),
            #    the form is submitted.
            r = httpx.post(f"{api}/deployments/{daily['id']}/create_flow_run", json={"parameters": params1},
                           timeout=30)
            assert r.status_code == 201, r.text
            run1 = r.json()
            state1 = wait_for("run 1 to start", lambda: _past_scheduled(api, run1["id"]), 120)
            assert state1 in {"PENDING", "RUNNING"}, f"run 1 is {state1} already: nothing to wait for"
            page.get_by_role("button", name="Submit").click()
            run2 = wait_for("the custom run", lambda: next(
                (r for r in flow_runs(api, daily["id"]) if r["id"] != run1["id"]), None), 60)

            # 3. The deployment page shows the daily schedule (cron 0 3 * * *, UTC) and both runs.
            page.goto(f"{stack.ui}/deployments/deployment/{daily['id']}")
            page.get_by_text("At 03:00 AM every day").first.wait_for()
            page.get_by_text(run2["name"]).first.wait_for()
            shot("2-deployment-schedule-and-runs.png")
            assert run2["parameters"] == {"config_path": TINY, "overrides": edited}

            # 4. Run 1 completes: snapshot published, MLflow parent run with the headline metrics.
            assert wait_finished(api, run1["id"], 300, stack.services) == "COMPLETED"
            t_run1 = time.monotonic() - t0
            snap1 = Storage(home).current()
            assert snap1 is not None and snap1.manifest["datasets"]["interactions"]["rows"] == 800
            mlflow = MlflowClient(tracking_uri=stack.mlflow)
            exp = mlflow.get_experiment_by_name("qarm-tiny")
            parent1 = _parent_run(mlflow, exp.experiment_id, run1["id"])
            assert parent1.info.status == "FINISHED"
            metrics1 = parent1.data.metrics
            assert set(HEADLINE) <= set(metrics1), sorted(metrics1)
            assert any(k.startswith("judge.auc.") for k in metrics1), sorted(metrics1)

            # 5. rank-train, started by the automation, on run 1's config and overrides.
            rank1 = wait_for("rank-train after run 1", lambda: next(
                (r for r in flow_runs(api, rank["id"]) if r["parameters"] == params1), None), 90)

            # 6. The custom run waited for run 1 (ENQUEUE), then completed with the edited override.
            assert wait_finished(api, run2["id"], 300, stack.services) == "COMPLETED"
            run1 = httpx.get(f"{api}/flow_runs/{run1['id']}", timeout=10).json()
            run2 = httpx.get(f"{api}/flow_runs/{run2['id']}", timeout=10).json()
            assert "AwaitingConcurrencySlot" in _state_names(api, run2["id"])
            assert _ts(run2["start_time"]) >= _ts(run1["end_time"])
            snap2 = Storage(home).current()
            assert snap2 is not None and snap2.snapshot_id != snap1.snapshot_id
            parent2 = _parent_run(mlflow, exp.experiment_id, run2["id"])
            assert parent2.data.params["config.quantize.mode"] == "refit"
            assert set(HEADLINE) <= set(parent2.data.metrics)
            page.goto(f"{stack.ui}/flow-runs/flow-run/{run2['id']}?tab=Parameters")
            page.get_by_text("Completed").first.wait_for()
            page.get_by_text("refit").first.wait_for()
            shot("3-custom-run-completed.png")

            # 7. MLflow's compare page for the two refreshes: the AUC metrics at the top of its metrics
            #    table, the collision rates further down.
            q = urllib.parse.urlencode({"runs": json.dumps([parent1.info.run_id, parent2.info.run_id]),
                                        "experiments": json.dumps([exp.experiment_id])})
            page.goto(f"{stack.mlflow}/#/compare-runs?{q}")
            page.get_by_text("judge.auc.").first.wait_for()
            seen = page.inner_text("body")
            assert "Comparing 2 Runs" in seen
            shot("4-mlflow-compare.png")
            # The table is two virtualised grids: names, and values whose scroll the names follow one
            # scroll event late; hence two scrolls, the second to where the names should be.
            values = page.locator(".ReactVirtualized__Grid").last
            values.scroll_into_view_if_needed()
            names = sorted(set(metrics1) | set(parent2.data.metrics))
            for y in (1 << 20, 45 * names.index("quantize.raw.collision_rate")):
                values.evaluate("(g, y) => { g.scrollTop = y + 1; }", y)
                time.sleep(0.3)
                values.evaluate("(g, y) => { g.scrollTop = Math.min(y, g.scrollHeight - g.clientHeight - 1); }", y)
                time.sleep(0.3)
                seen += page.inner_text("body")
            shot("5-mlflow-compare-collisions.png", full_page=False)
            for name in [*HEADLINE[:2], *(k for k in metrics1 if k.startswith("judge.auc."))]:
                assert name in seen, name
            browser.close()
    finally:
        shutil.rmtree(SCREENSHOTS, ignore_errors=True)
        shutil.copytree(shots, SCREENSHOTS, dirs_exist_ok=True)

    assert wait_finished(api, rank1["id"], 120, stack.services) == "COMPLETED"

    # 8. Postgres is real: both servers' rows are in it, and nothing went to SQLite.
    for db in ("prefect", "mlflow"):
        (version,), = stack.pg.query(db, "SELECT version()")
        assert version.startswith("PostgreSQL"), version
    assert stack.pg.query("prefect", "SELECT state_type FROM flow_run WHERE id = %s", (run1["id"],)) == [("COMPLETED",)]
    assert stack.pg.query("prefect", "SELECT name FROM deployment ORDER BY name") == \
        [(DAILY,), (RANK,), ("weekly-retrain-ml100k",)]
    assert stack.pg.query("mlflow", "SELECT status FROM runs WHERE run_uuid = %s",
                          (parent1.info.run_id,)) == [("FINISHED",)]
    assert not list(stack.prefect_home.glob("*.db")) and not (home / "mlflow.db").exists()
    connected = dict(stack.pg.query("postgres", "SELECT datname, count(*) FROM pg_stat_activity "
                                                "WHERE datname IN ('prefect', 'mlflow') GROUP BY datname"))
    assert connected.get("prefect", 0) > 0 and connected.get("mlflow", 0) > 0, connected   # the servers' pools
    print(f"run 1 completed at {t_run1:.0f} s, everything checked at {time.monotonic() - t0:.0f} s")
