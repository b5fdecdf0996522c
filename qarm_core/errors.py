"""Errors that name the stage, the dataset and what is wrong."""

from __future__ import annotations


class QarmError(Exception):
    """Base class of every error qarm raises on purpose."""


class ConfigError(QarmError):
    """The pipeline config is unreadable, has unknown keys or wrong types."""


class StorageError(QarmError):
    """A snapshot or pointer in QARM_HOME is missing or inconsistent."""


class DataError(QarmError):
    """Input data of a stage is unusable.

    The message always starts with ``[stage=..., dataset=...]`` so that a failed Prefect run or a CLI
    error tells the operator where to look without reading a traceback.
    """

    def __init__(self, stage: str, dataset: str, problem: str):
        self.stage = stage
        self.dataset = dataset
        self.problem = problem
        super().__init__(f"[stage={stage}, dataset={dataset}] {problem}")


class GateError(DataError):
    """A data gate failed; ``failures`` holds one entry per failed expectation."""

    def __init__(self, stage: str, dataset: str, failures: list[dict]):
        self.failures = failures
        parts = []
        for f in failures:
            sample = f.get("sample")
            sample_txt = f", e.g. {sample}" if sample else ""
            parts.append(f"{f['expectation']}{_kwargs_txt(f.get('kwargs'))}: "
                         f"{f.get('unexpected_count', '?')} unexpected{sample_txt}")
        # One line (the CLI prints it as its one error line): the failures joined by " | "
        problem = f"gate failed, {len(failures)} expectation(s) not met: " + " | ".join(parts)
        super().__init__(stage, dataset, problem)


def _kwargs_txt(kwargs: dict | None) -> str:
    if not kwargs:
        return ""
    return "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"



STOPPED_BY = "stopped by "


class Stopped(KeyboardInterrupt):
    """A signal (SIGTERM, SIGINT, SIGHUP) asked a command to stop; a BaseException, so no handler
    swallows it. ``signal`` is the signal's number, as on Prefect's ``TerminationSignal``."""

    def __init__(self, signal: int):
        import signal as signal_mod

        self.signal = signal
        super().__init__(f"{STOPPED_BY}{signal_mod.Signals(signal).name}")


# Signals that asked this process to stop, in order. A stop can reach code that turns it into
# another error without a link back (DuckDB raises RuntimeError("Query interrupted") for a signal
# that lands during a query), so the command and the retry rule also ask here.
_STOPS: list[int] = []


def note_stop(signum: int) -> None:
    """Record that signal ``signum`` asked this process to stop."""
    _STOPS.append(signum)


def forget_stops() -> None:
    """A new command starts: no stop asked yet."""
    _STOPS.clear()


def raise_if_stopped() -> None:
    """Raise ``Stopped`` if a signal asked this process to stop: a stage boundary's check, for a
    signal whose exception was swallowed where it landed (seen: inside Prefect's event service, after
    which a SIGTERM'd refresh ran on and published)."""
    if _STOPS:
        raise Stopped(_STOPS[0])


def stop_requested() -> str | None:
    """The name of the first signal that asked this process to stop, or None."""
    import signal as signal_mod

    return signal_mod.Signals(_STOPS[0]).name if _STOPS else None


def stop_signal_name(exc: BaseException | None) -> str | None:
    """The name of the signal that stopped a run, if ``exc`` or an exception it was raised from or
    while handling carries an int ``signal`` (``Stopped``, Prefect's ``TerminationSignal``). Why the
    whole chain: a signal that lands while Prefect creates a task run makes Prefect's crash handler
    raise its own error ("Task run is not set") while handling the signal, and that error, not the
    signal, unwinds the flow.
    """
    import signal as signal_mod

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        sig = getattr(exc, "signal", None)
        if isinstance(sig, int) and not isinstance(sig, bool):
            try:
                return signal_mod.Signals(sig).name
            except ValueError:
                return f"signal {sig}"
        exc = exc.__cause__ or exc.__context__
    return None
