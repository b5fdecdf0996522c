"""Shared benchmark plumbing: run a phase in its own process (so its peak RSS is its own), measure
its wall time, CPU time and peak RSS, and print Markdown tables.

A phase is a function ``module:function`` returning a JSON-able dict; ``run_phase`` calls it in a
child Python process with BLAS/OpenMP threads pinned, and adds ``wall_seconds`` (measured by the
parent, child start-up and imports included), ``phase_cpu_seconds`` (the child's user + system
time, all threads) and ``peak_rss_gib`` (the child's ru_maxrss).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
GIB = 2.0 ** 30

_CHILD = """
import json, resource, sys
sys.path.insert(0, {repo!r})
import importlib
mod, fn = sys.argv[1].split(":")
r = getattr(importlib.import_module(mod), fn)(**json.loads(sys.argv[2]))
ru = resource.getrusage(resource.RUSAGE_SELF)
r["peak_rss_gib"] = ru.ru_maxrss * 1024 / 2 ** 30
r["phase_cpu_seconds"] = ru.ru_utime + ru.ru_stime
print("@@RESULT@@" + json.dumps(r))
"""


def run_phase(target: str, pin_threads: int | None = None, timeout: float | None = None, **kwargs: Any) -> dict:
    """Run ``target`` ("package.module:function") with ``kwargs`` in a child process.

    ``pin_threads`` pins OMP/OpenBLAS/MKL threads through the environment (None: leave as is).
    Raises SystemExit with the child's stderr tail if it fails.
    """
    env = dict(os.environ)
    if pin_threads:
        t = str(pin_threads)
        env |= {"OMP_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t, "MKL_NUM_THREADS": t, "NUMBA_NUM_THREADS": t}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(repo=str(REPO)), target, json.dumps(kwargs)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"phase {target} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
    if not lines:
        raise SystemExit(f"phase {target} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    r = json.loads(lines[-1][len("@@RESULT@@"):])
    r["wall_seconds"] = wall
    return r


def machine() -> str:
    """The CPU (model, cores, the flags that set float32/bf16 speed, native bf16 or not), the GPU
    if any, and the load: printed next to every benchmark's figures."""
    from qarm_core.devices import hardware_summary

    return f"{hardware_summary()}; {loadavg()}"


def loadavg() -> str:
    """The 1/5/15-minute load averages, as `uptime` prints them."""
    try:
        a, b, c = os.getloadavg()
        return f"load average {a:.2f}, {b:.2f}, {c:.2f} ({os.cpu_count()} CPUs)"
    except OSError:  # pragma: no cover
        return "load average unavailable"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` one char per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])
