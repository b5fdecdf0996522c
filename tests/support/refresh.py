"""A real `qarm refresh` process for the drills of tests/reliability: its own process group, its output
collected by a thread, talking to the test harness's Prefect API (so that no process spends its time
starting a server of its own)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.support.paths import REPO, TINY


def harness_api_url() -> str:
    """The Prefect API the session's ``prefect_harness`` serves."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


class Refresh:
    """One `qarm refresh --config TINY --set home=HOME [extra...]` process in its own process group."""

    def __init__(self, home: Path, api_url: str, extra: list[str] = ()):
        env = {**os.environ, "QARM_HOME": str(home), "PREFECT_API_URL": api_url, "PYTHONUNBUFFERED": "1",
               "COLUMNS": "200"}
        cmd = [sys.executable, "-c", "from flows.cli import app; app()", "refresh", "--config", str(TINY), *extra,
               "--set", f"home={home}"]
        self.home = home
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def saw_task(self, stage: str) -> bool:
        return any(f"Task run '{stage}-" in line for line in list(self.lines))

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)

    def finish(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except BaseException:
            self.kill()                      # a hung or interrupted drill leaves no process behind
            raise
        self._reader.join(timeout=10)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)
