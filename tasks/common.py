"""What every qarm task shares: task options, the stage skeleton (``run_stage``), core log routing."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import pyarrow as pa
from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE

from qarm_core import __version__
from qarm_core.config import PipelineConfig
from qarm_core.errors import (QarmError, Stopped, command_running, forget_stops, raise_if_stopped,
                              reclaim_stop_signals, record_stop_signals, recorded_stops, recording_stops,
                              stop_requested)
from qarm_core.hashing import stable_hash
from qarm_core.schemas import DatasetSchema
from qarm_core.storage import DatasetRecord, Storage, write_stage_outputs
from tasks import tracking

if TYPE_CHECKING:
    from qarm_core.lease import Lease


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (IO, network) but never bad input or bad config: those fail alike
    on every attempt, and retrying them only delays the error the operator needs to see. Nor after
    a stop signal, whatever error it became (a query DuckDB was running fails "interrupted")."""
    if stop_requested() is not None:
        return False
    try:
        state.result()
    except QarmError:
        return False
    except Exception:
        return True
    return False


# Stage outputs are cached by qarm's storage on input fingerprints (work/<stage>/<key>), which
# survives crashes and process restarts; Prefect's own result cache is therefore switched off.
TASK_DEFAULTS = dict(cache_policy=NO_CACHE, retry_condition_fn=retry_unless_bad_input)


def route_core_logs() -> None:
    """Show what ``qarm_core`` logs (progress of long work: pairs judged, training steps, items
    embedded, k-means passes) where Prefect's run logs go: the console, and inside a flow run the
    run's log in the Prefect UI. Idempotent."""
    from prefect.logging.handlers import APILogHandler

    core = logging.getLogger("qarm_core")
    core.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in core.handlers):
        core.addHandler(APILogHandler())


# Rows per record batch when a produced table is written.
BATCH_ROWS = 1_000_000


@dataclass(frozen=True)
class StageSpec:
    """One stage as a task runs it.

    ``key_inputs``: everything the outputs depend on (input fingerprints, the stage's resolved config
    section), or a function returning it (called inside the stage's run, so an error it raises, e.g.
    an unreadable source, fails that run); the cache key is their hash with qarm's version and the
    outputs' schema versions.
    ``produce``: runs the core stage once and returns ``(tables by output name, report)``.
    ``artifacts``: outputs that are folders, not tables: name -> (format version, writer given the
    folder and the produced tables). ``summary``: the one log line. ``after``: runs last inside the
    stage's MLflow run, once the outputs are written (or reused), e.g. a quality gate that raises.
    """

    name: str
    key_inputs: Mapping[str, Any] | Callable[[], Mapping[str, Any]]
    outputs: Mapping[str, DatasetSchema]
    produce: Callable[[], tuple[Mapping[str, Any], dict]]
    params: Mapping[str, Any] = field(default_factory=dict)
    artifacts: Mapping[str, tuple[int, Callable[[Path, Mapping[str, Any]], None]]] = field(default_factory=dict)
    after: Callable[[tracking.StageRun, dict[str, DatasetRecord], dict], None] | None = None
    summary: Callable[[dict[str, DatasetRecord], dict], str] | None = None


@contextlib.contextmanager
def flow_stop_signals() -> Iterator[None]:
    """Around a flow's body: who turns a stop signal into the run's end. Under a qarm command (``qarm
    refresh`` and the like) the command's handler, put back where Prefect's engine replaced it
    (``reclaim_stop_signals``). In a flow run a Prefect worker or ``serve`` started, Prefect's
    SIGTERM bridge stays (it tells a UI cancel from a crash), and the stop signals are recorded as
    well: a cancel whose TerminationSignal was lost where it landed (a ``__del__``, a weakref
    callback: "Exception ignored in ...") still ends the run at the next progress tick or stage
    start, raised as Prefect's TerminationSignal when a SIGTERM came (else ``Stopped``), which the
    engine handles as its own (Cancelled on a cancel, else Crashed and the signal passed on). A stop
    that became another error on its way out (DuckDB's "Query interrupted") is raised as that stop.
    A stop recorded after the body's last check does not undo a run that finished. The stops are
    forgotten when the block ends: no command reads them afterwards."""
    import signal
    import threading

    if command_running():
        reclaim_stop_signals()
        yield
        return
    if recording_stops() or threading.current_thread() is not threading.main_thread():
        yield                           # a subflow of a recorded run; or no signals off the main thread
        return
    from prefect.exceptions import TerminationSignal

    def raise_as(signum: int) -> BaseException:
        # a SIGTERM is the runner's cancel (or a shutdown) whichever signal came first
        return TerminationSignal(signal.SIGTERM) if signal.SIGTERM in recorded_stops() else Stopped(signum)

    forget_stops()
    try:
        with record_stop_signals(raise_as):
            try:
                yield
            except Exception as exc:
                stops = recorded_stops()
                if stops:
                    raise raise_as(stops[0]) from exc
                raise
    finally:
        forget_stops()


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy) every file of ``src`` into ``dst``: a staged model costs no copy."""
    for p in sorted(src.rglob("*")):
        if p.is_file():
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)


def stage_key(spec: StageSpec) -> str:
    """The cache key of a stage's outputs: computed from what they depend on, never from literals."""
    inputs = spec.key_inputs() if callable(spec.key_inputs) else spec.key_inputs
    return stable_hash({**inputs, "qarm": __version__, "schemas": {n: s.version for n, s in spec.outputs.items()},
                        **({"artifacts": {n: v for n, (v, _) in spec.artifacts.items()}} if spec.artifacts else {})})


def is_timing(key: str) -> bool:
    """Whether a report entry is a timing or a rate (``seconds.fsq``, ``fit_seconds``, ``eval_s``,
    ``pairs_per_s``): it describes the run that made an output, not a run that reuses it."""
    return any(part == "seconds" or part.endswith(("_seconds", "_s")) for part in key.split("."))


def run_stage(cfg: PipelineConfig, parent_run_id: str, spec: StageSpec) -> tuple[dict[str, DatasetRecord], dict]:
    """Write (or reuse) a stage's outputs under ``work/<stage>/<key>`` and log the stage run:
    params (with the key), numeric report entries, row counts, whether it was reused, the report's
    ``notes`` as ``qarm.*`` tags. Returns (records, report). A stage starts nothing once a stop
    signal arrived (``raise_if_stopped``)."""
    reclaim_stop_signals()
    raise_if_stopped()
    storage = Storage(cfg.home)
    made: dict[str, Any] = {}
    report: dict = {}

    def ensure_made() -> Mapping[str, Any]:
        if not made:
            tables, rep = spec.produce()
            made.update(tables)
            report.update(rep)
        return made

    def batches(name: str):
        def gen():
            table = ensure_made()[name]
            return iter(table.to_batches(max_chunksize=BATCH_ROWS)) if isinstance(table, pa.Table) else table
        return gen

    artifacts = {n: (version, (lambda folder, w=write: w(folder, ensure_made())))
                 for n, (version, write) in spec.artifacts.items()}
    with tracking.stage_run(cfg, parent_run_id, spec.name) as run:
        key = stage_key(spec)
        records, reused, report = write_stage_outputs(
            storage, spec.name, key, {n: (schema, batches(n)) for n, schema in spec.outputs.items()}, report,
            artifacts=artifacts)
        run.params({**spec.params, "key": key})
        # a reused output's report is the earlier run's: its quality figures hold, its timings don't
        run.metrics({k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and not (reused and is_timing(k))}
                    | {f"rows.{n}": r.rows for n, r in records.items() if n in spec.outputs}
                    | {"reused": float(reused)})
        run.tags({f"qarm.{k}": v for k, v in report.get("notes", {}).items()})
        if spec.summary is not None:
            text = spec.summary(records, report)
            get_run_logger().info(f"{spec.name}: reused the outputs of an earlier run with the same inputs; "
                                  f"as that run reported: {text}" if reused else text)
        if spec.after is not None:      # last: it may raise (a failed quality gate fails the stage run)
            spec.after(run, records, report)
    return records, report


def published_table(storage: Storage, dataset: str) -> tuple[pa.Table | None, DatasetRecord | None]:
    """The last published table of ``dataset`` and its record (None, None without one): the cache a
    daily refresh reuses."""
    from qarm_core.storage import read_dataset

    rec = storage.published_cache(dataset)
    return (read_dataset(rec) if rec is not None else None), rec


# Leases this process holds, by (home, purpose): a block nested in another of the same home and
# purpose (the CLI takes the lease before it starts the flow, which takes it again) shares it.
_HELD: dict[tuple[str, str], "Lease"] = {}


@contextlib.contextmanager
def exclusive_home(cfg: PipelineConfig, purpose: str) -> Iterator["Lease"]:
    """Hold the home's refresh lease (``qarm_core.lease``) for the block: taken before any MLflow or
    storage work, so two refreshes never race (not even to create the MLflow store); the second
    one exits with BusyError naming the holder, or waits (``flow.on_busy``). Re-entrant within a
    process: `qarm refresh` takes it before starting the flow, so that a busy home is refused with
    one line, before Prefect runs (and logs the refusal as a flow failure with its traceback)."""
    from qarm_core.lease import Lease

    storage = Storage(cfg.home)
    key = (storage.where, purpose)
    if key in _HELD:
        yield _HELD[key]
        return
    f = cfg.flow
    if storage.remote is not None:          # an s3:// home: the lease is an object beside CURRENT
        from qarm_core.objectstore import ObjectLease

        lease = ObjectLease(storage.remote, purpose, ttl_s=f.lease_ttl_s, heartbeat_s=f.lease_ttl_s / 6)
    else:
        lease = Lease(cfg.home, purpose, ttl_s=f.lease_ttl_s, heartbeat_s=f.lease_ttl_s / 6)
    lease.acquire(wait_s=f.busy_wait_s if f.on_busy == "wait" else 0.0)
    _HELD[key] = lease
    try:
        yield lease
    finally:
        del _HELD[key]
        lease.release()


def adopt_run(cfg: PipelineConfig, lease: "Lease", run_id: str, flow_run_id: str = "") -> None:
    """Record this run in the lease; close the MLflow runs and the Prefect flow run of a dead holder
    it took over and remove the temporary folders dead runs left (safe: no other refresh runs while
    the lease is held)."""
    lease.annotate(run_id, flow_run_id)
    gone = Storage(cfg.home).remove_dead_leftovers()
    if gone:
        get_run_logger().warning("removed %d temporary folder(s) left by killed runs: %s", len(gone), gone[:5])
    dead = lease.taken_over
    if dead is not None and dead.run_id:
        n = tracking.close_abandoned_run(cfg, dead.run_id, f"abandoned: its process died ({dead.purpose}, pid "
                                                           f"{dead.pid} on {dead.host}); closed by run {run_id}")
        if n:
            get_run_logger().warning("closed %d MLflow run(s) left RUNNING by a dead refresh (pid %s)", n, dead.pid)
    if dead is not None and dead.flow_run_id:
        _crash_flow_run(dead.flow_run_id, f"abandoned: its process died (pid {dead.pid} on {dead.host})")


def _crash_flow_run(flow_run_id: str, why: str) -> None:
    """Mark a Prefect flow run left RUNNING by a dead process as Crashed (no-op if it ended or is unknown)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and not run.state.is_final():
                client.set_flow_run_state(flow_run_id, Crashed(message=why), force=True)
                get_run_logger().warning("marked Prefect flow run %s crashed: %s", flow_run_id, why)
    except Exception as exc:  # noqa: BLE001 -- another API, a pruned run: closing it is best effort
        get_run_logger().warning("could not close Prefect flow run %s: %s", flow_run_id, exc)


def current_snapshot_id(cfg: PipelineConfig) -> str | None:
    """The id of the snapshot CURRENT names (None before the first publish)."""
    snap = Storage(cfg.home).current()
    return snap.snapshot_id if snap is not None else None
