"""The production topology from this machine's packages, without docker: Postgres (Debian's package), a
``prefect server`` and an ``mlflow server`` both on it, and a process worker. Each service runs in its
own process group, logs to a file, and ``Services.stop`` ends every process it started (and their
children: a process worker starts each flow run in a new session) even when a test fails.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import httpx

T = TypeVar("T")
VENV_BIN = Path(sys.executable).parent
# Quiet, and no calls home, in every service.
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
         "PREFECT_LOGGING_LEVEL": "WARNING"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, fn: Callable[[], T], timeout: float, every: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, or in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return versions[-1] if versions else None


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM


@dataclass
class Services:
    """Processes started for a test, stopped in reverse order by ``stop``."""

    logs: Path
    started: list[Service] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None,
              user: str | None = None, stop_signal: int = signal.SIGTERM) -> Service:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, user=user)
        svc = Service(name, proc, log, stop_signal)
        self.started.append(svc)
        return svc

    def check_alive(self) -> None:
        for s in self.started:
            if s.proc.poll() is not None:
                raise AssertionError(f"{s.name} exited with {s.proc.returncode}:\n{tail(s.log)}")

    def stop(self, timeout: float = 5.0) -> None:
        """Signal every service's process group and every descendant (flow runs of a process worker run
        in sessions of their own) at once, wait up to ``timeout``, then SIGKILL what is left."""
        import psutil

        tree = []
        for s in self.started:
            try:
                root = psutil.Process(s.proc.pid)
                tree += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for s in self.started:
            _signal_group(s.proc.pid, s.stop_signal)
        for p in tree:
            if p.pid not in {s.proc.pid for s in self.started}:
                _signal(p, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=timeout)
        for p in alive:
            _signal(p, signal.SIGKILL)
        for s in self.started:
            _signal_group(s.proc.pid, signal.SIGKILL)
            try:
                s.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.started.clear()
        for fn in reversed(self.cleanups):
            fn()
        self.cleanups.clear()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(p, sig: int) -> None:
    import psutil

    try:
        p.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@dataclass
class Postgres:
    host: str
    port: int
    user: str = "postgres"

    def url(self, db: str, driver: str = "") -> str:
        return f"postgresql{'+' + driver if driver else ''}://{self.user}@{self.host}:{self.port}/{db}"

    def connect(self, db: str = "postgres"):
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname=db, connect_timeout=3)
        conn.autocommit = True
        return conn

    def query(self, db: str, sql: str, args: tuple = ()) -> list[tuple]:
        conn = self.connect(db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()


def start_postgres(services: Services, databases: list[str]) -> Postgres:
    """A throwaway cluster (initdb into a fresh folder, trust auth, no fsync) on a free port of
    127.0.0.1, its socket in that folder; run as the ``postgres`` user when this is root (postgres
    refuses root). The folder is removed when the services stop."""
    initdb, postgres = pg_bin("initdb"), pg_bin("postgres")
    if not (initdb and postgres):
        raise RuntimeError("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    user = None
    if os.geteuid() == 0:   # the postgres user of Debian's package, else nobody
        user = "postgres" if _user_exists("postgres") else "nobody"
        pw = pwd.getpwnam(user)
    root = Path(tempfile.mkdtemp(prefix="qarm-pg-"))   # not under pytest's tmp: the user must reach it
    services.cleanups.append(lambda: shutil.rmtree(root, ignore_errors=True))
    if user:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data, port = root / "data", free_port()
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "LANG": "C"}
    subprocess.run([initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync",
                    "--no-instructions"], env=env, user=user, check=True, capture_output=True, timeout=120)
    services.start("postgres", [postgres, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(root),
                                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                   env=env, user=user, stop_signal=signal.SIGINT)   # SIGINT: the fast shutdown
    pg = Postgres("127.0.0.1", port)

    def ready():
        services.check_alive()
        try:
            pg.connect().close()
            return True
        except Exception:
            return False
    wait_for("Postgres", ready, 60, every=0.2)
    for db in databases:
        pg.query("postgres", f'CREATE DATABASE "{db}"')
    return pg


def start_prefect_server(services: Services, pg: Postgres, home: Path, env: dict[str, str]) -> str:
    """``prefect server start`` with its database in Postgres; returns the API URL (not yet healthy)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**env, "PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": pg.url("prefect", "asyncpg"),
           "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_UI_URL": url,   # what the UI in a browser calls
           # a run that waited for the deployment's concurrency slot is retried after this (default 30 s)
           "PREFECT_DEPLOYMENT_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
           # no runs from the crons (a 03:00 UTC ML-100K run must not start in a test); runs are made on demand
           "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    services.start("prefect-server", [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                      "--port", str(port)], env=env)
    return f"{url}/api"


def start_mlflow_server(services: Services, pg: Postgres, artifacts: Path, env: dict[str, str]) -> str:
    """``mlflow server`` with a Postgres backend store; returns its URL (not yet healthy)."""
    port = free_port()
    services.start("mlflow-server", [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", pg.url("mlflow"),
                                     "--default-artifact-root", artifacts.as_uri(), "--host", "127.0.0.1",
                                     "--port", str(port), "--workers", "1"],
                   env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})   # no job runner + 7 consumers
    return f"http://127.0.0.1:{port}"


def prefect_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> str:
    r = subprocess.run([str(VENV_BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def flow_runs(api: str, deployment_id: str | None = None) -> list[dict]:
    body: dict = {"sort": "EXPECTED_START_TIME_ASC"}
    if deployment_id:
        body["deployments"] = {"id": {"any_": [deployment_id]}}
    r = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10)
    r.raise_for_status()
    return r.json()


def flow_run_state(api: str, run_id: str) -> str | None:
    r = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10)
    return ((r.json() if r.status_code == 200 else {}).get("state") or {}).get("type")


def wait_finished(api: str, run_id: str, timeout: float, services: Services | None = None) -> str:
    def done():
        if services:
            services.check_alive()
        s = flow_run_state(api, run_id)
        return s if s in TERMINAL else None
    return wait_for(f"flow run {run_id}", done, timeout, every=1.0)


def chromium_path() -> str | None:
    """Debian's Chromium (apt-get install chromium), or another Chromium/Chrome on PATH."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Headless, and nothing that calls home or needs a GPU.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
