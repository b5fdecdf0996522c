"""The Prefect API a flow command reports to when no ``PREFECT_API_URL`` is set: a local server that
this process starts, owns and stops, in place of Prefect's own ephemeral one.

Why not Prefect's: it starts its uvicorn server as a plain child, in the terminal's process group, so
a Ctrl-C (which the terminal sends to the whole group) stopped the server at the moment the refresh
needed it to record the stop; the refresh then waited minutes in Prefect's exit-time flush and
left its flow run RUNNING. This server runs the same app (``prefect.server.api.server:create_app``,
UI off, ephemeral settings) in a session of its own, so only the CLI receives the terminal's signal,
records the stop through it, and then stops it. It dies with the CLI even when the CLI is killed
(SIGKILL): Linux's parent-death signal, and a watch on the parent's pid elsewhere.

The CLI binds the listening socket itself (port 0: no race for a free port between two refreshes)
and hands it to the server, so the address is known before the server starts.

    python -m flows.prefect_api --fd N --parent PID     # what ``local_prefect_api`` runs
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

from qarm_core.errors import QarmError, raise_if_stopped

# The environment Prefect gives its own ephemeral server (prefect.server.api.server.SubprocessASGIServer).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
APP = "prefect.server.api.server:create_app"
# Prefect's own startup timeout (20 s by default) is too short for a first start on a fresh Prefect
# database on a busy 2-core machine (its migrations): the CLI waits at least this long.
MIN_STARTUP_S = 120.0
STOP_WAIT_S = 5.0
DRAIN_WAIT_S = 5.0
_PR_SET_PDEATHSIG = 1


class PrefectApiError(QarmError):
    """The local Prefect API server could not be started."""

    def __init__(self, problem: str):
        super().__init__(f"[stage=prefect-api] {problem}")


def configured_api_url() -> str | None:
    """The Prefect API address from the environment or the active profile; None when unset."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _set_api_url(url: str | None) -> None:
    """Make ``url`` (None: unset) the API address of this process, its threads (Prefect's event and
    log workers read the global settings context) and the processes it starts."""
    from prefect.context import refresh_global_settings_context

    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


def _healthy(url: str, timeout_s: float) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down gracefully), then SIGKILL after ``STOP_WAIT_S``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_server(startup_timeout_s: float | None = None) -> tuple[subprocess.Popen, str]:
    """Start the server in its own session; returns (the process, its API URL ``http://127.0.0.1:PORT/api``)
    once ``/api/health`` answers. Raises PrefectApiError when it exits or does not answer in time."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

    timeout = max(float(startup_timeout_s or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()),
                  MIN_STARTUP_S)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True), **SERVER_ENV}
        env.pop("PREFECT_API_URL", None)
        # this module importable whatever the working directory (kept: relative paths in the settings)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        proc = subprocess.Popen([sys.executable, "-m", "flows.prefect_api", "--fd", str(sock.fileno()),
                                 "--parent", str(os.getpid())],
                                pass_fds=(sock.fileno(),), start_new_session=True, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    finally:
        sock.close()                      # the server holds its own copy; connections queue on it
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PrefectApiError(f"the local Prefect API server exited with status {proc.returncode} while "
                                      "starting (its error is printed above); set PREFECT_API_URL to use a running "
                                      "server")
            if _healthy(url, timeout_s=2.0):
                return proc, url
            raise_if_stopped()            # a stop landing in the health check's HTTP call is only recorded
            time.sleep(0.1)
    except BaseException:                 # a stop signal while waiting: the server goes too
        stop_server(proc)
        raise
    stop_server(proc)
    raise PrefectApiError(f"the local Prefect API server did not answer within {timeout:.0f} s; set "
                          "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or PREFECT_API_URL to a running server")


@contextlib.contextmanager
def local_prefect_api() -> Iterator[str | None]:
    """The API the flow run inside reports to: the configured ``PREFECT_API_URL`` when set (yielded,
    nothing started), else a local server started here (its URL set as ``PREFECT_API_URL`` for the
    block and stopped after it, also when the block fails or is stopped by a signal). Yields None
    where Prefect's ephemeral mode is off and no URL is set (Prefect then says so itself)."""
    url = configured_api_url()
    if url:
        yield url
        return
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED

    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield None
        return
    proc, url = start_server()
    _set_api_url(url)
    try:
        yield url
    finally:
        _drain_prefect_workers()
        _set_api_url(None)
        stop_server(proc)


def _drain_prefect_workers(timeout_s: float = DRAIN_WAIT_S) -> None:
    """Send what Prefect's log and event workers still hold (the run's last logs, its final state's
    events) while the server is up; Prefect would otherwise flush them at exit, to a stopped server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        # a drained service warns "Still processing items: N items remaining" about the items it is
        # about to send: expected here, not news for the terminal
        log = logging.getLogger(worker.__name__)
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with contextlib.suppress(Exception):   # the server is stopped next whatever happens here
                worker.drain_all(timeout=timeout_s, at_exit=False)
        finally:
            log.setLevel(level)


# ---------------------------------------------------------------- the server process
def _die_with_parent(parent: int) -> None:
    """Exit when ``parent`` does: SIGTERM from the kernel on Linux, a 1-second watch where that is
    not available."""
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) == 0
    if os.getppid() != parent:            # the parent died before the signal was armed
        sys.exit(0)
    if armed:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="The local Prefect API server of a qarm flow command.")
    ap.add_argument("--fd", type=int, required=True, help="a listening TCP socket inherited from the CLI")
    ap.add_argument("--parent", type=int, required=True, help="the CLI's pid: the server exits with it")
    args = ap.parse_args(argv)
    _die_with_parent(args.parent)
    import uvicorn

    sock = socket.socket(fileno=args.fd)
    server = uvicorn.Server(uvicorn.Config(APP, factory=True, log_level="error", lifespan="on"))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
