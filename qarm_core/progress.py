"""Progress of long work, as log lines at a steady pace: done/total, rate, ETA.

The library only logs (logger ``qarm_core.progress``); where the lines go is the caller's choice:
the flows route them into Prefect's run log (console and UI, ``tasks.common.route_core_logs``),
the standalone CLI commands to the terminal. A line is written when the work starts, then at most
every ``every_s`` seconds (``QARM_PROGRESS_EVERY_S``, default 10), and once when it ends, e.g.::

    judge: scoring pairs 2,048/8,089 (25%), 31.4 pairs/s, ETA 3m12s
    train: steps 12/40 (30%), 4.1 s/step, ETA 1m55s, loss 2.031, tokens/s 312
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

from qarm_core.errors import raise_if_stopped

T = TypeVar("T")

log = logging.getLogger("qarm_core.progress")

DEFAULT_EVERY_S = 10.0


def _every_s() -> float:
    try:
        return max(0.0, float(os.environ.get("QARM_PROGRESS_EVERY_S", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``; under a minute: ``42s``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


class Progress:
    """Counts units of work done toward ``total`` (None: unknown) and logs how it goes.

    ``advance(n, **fields)`` adds n units; ``fields`` (e.g. ``loss=2.03``) are shown on the next
    line. ``finish()`` logs the closing line (units, seconds, rate) once; using the object as a
    context manager calls it. ``emit`` replaces the logger (e.g. a test collecting lines).
    ``quiet``: for work that is usually short (a gate, reading a file): no start line, and a
    closing line only if the work lasted long enough to log progress.
    """

    def __init__(self, stage: str, what: str, total: int | None, unit: str = "items",
                 every_s: float | None = None, emit: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, quiet: bool = False):
        self.stage, self.what, self.total, self.unit = stage, what, total, unit
        self.every_s = _every_s() if every_s is None else every_s
        self._emit = emit or log.info
        self._clock = clock
        self.done = 0
        self.fields: dict[str, object] = {}
        self._t0 = self._last = clock()
        self._finished = False
        self._lock = threading.Lock()     # HTTP backends advance from several threads
        self.quiet = quiet
        if not quiet:
            size = f" {total:,} {unit}" if total is not None else ""
            self._emit(f"{stage}: {what}:{size} to do")

    @property
    def elapsed(self) -> float:
        return self._clock() - self._t0

    def rate(self) -> float:
        """Units per second so far (0 before any time has passed)."""
        dt = self.elapsed
        return self.done / dt if dt > 0 else 0.0

    def line(self) -> str:
        """The current progress line (what ``advance`` logs)."""
        r = self.rate()
        parts = [f"{self.stage}: {self.what} {self.done:,}"]
        if self.total:
            parts[0] += f"/{self.total:,} ({100.0 * self.done / self.total:.0f}%)"
        if r >= 1 or r == 0:
            parts.append(f"{r:,.1f} {self.unit}/s")
        else:
            parts.append(f"{1 / r:.1f} s/{singular(self.unit)}")
        if self.total and r > 0 and self.done < self.total:
            parts.append(f"ETA {format_duration((self.total - self.done) / r)}")
        parts += [f"{k} {_fmt(v)}" for k, v in self.fields.items()]
        return ", ".join(parts)

    def advance(self, n: int = 1, **fields: object) -> None:
        # a stop whose exception was lost where it landed still ends long work at its next tick
        raise_if_stopped()
        with self._lock:
            self.done += n
            self.fields.update(fields)
            now = self._clock()
            due = now - self._last >= self.every_s
            if due:
                self._last = now
                line = self.line()
        if due:
            self._emit(line)

    def finish(self, **fields: object) -> None:
        if self._finished:
            return
        self._finished = True
        if self.quiet and self.elapsed < self.every_s:
            return
        self.fields.update(fields)
        extra = "".join(f", {k} {_fmt(v)}" for k, v in self.fields.items())
        self._emit(f"{self.stage}: {self.what} done: {self.done:,} {self.unit} in "
                   f"{format_duration(self.elapsed)} ({self.rate():,.1f} {self.unit}/s){extra}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is None:
            self.finish()


def advance(progress: Progress | None, n: int = 1, **fields: object) -> None:
    """``progress.advance(n)`` when there is a progress object (core loops take an optional one)."""
    if progress is not None:
        progress.advance(n, **fields)


def counted(batches: Iterable[T], stage: str, what: str, total: int | None = None, unit: str = "rows") -> Iterator[T]:
    """``batches`` passed through unchanged, their rows (``num_rows``) counted as progress."""
    with Progress(stage, what, total, unit, quiet=True) as prog:
        for b in batches:
            yield b
            prog.advance(getattr(b, "num_rows", 1))


def singular(unit: str) -> str:
    """``steps`` -> ``step``, ``passes`` -> ``pass``, ``items`` -> ``item``; other words unchanged."""
    for plural, one in (("sses", "ss"), ("ches", "ch"), ("shes", "sh"), ("xes", "x"), ("s", "")):
        if unit.endswith(plural) and len(unit) > len(plural):
            return unit[: -len(plural)] + one
    return unit
