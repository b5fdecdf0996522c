"""Every MLflow call qarm makes lives here.

One parent run per flow run, one nested run per stage. Runs are created through ``MlflowClient``
with explicit run ids (not MLflow's thread-local active run), because Prefect may run tasks on
worker threads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from qarm_core.config import PipelineConfig, dump_config, redact_uri
from qarm_core.errors import STOPPED_BY, raise_if_stopped, recorded_stops, stop_signal_name
from qarm_core.gates import GateResult

_MAX_PARAM_CHARS = 6000


def _client(cfg: PipelineConfig) -> "MlflowCalls":
    return MlflowCalls(cfg.tracking.tracking_uri)


# How often a caller waiting for an MLflow call looks for a stop that came while it waited (s).
STOP_POLL_S = 0.2


class MlflowCalls:
    """An ``MlflowClient`` for ``uri`` whose every call runs to its end on one thread of this
    process (``_mlflow_thread``) while the caller waits for it. Why: a stop signal's exception
    raised inside a store write (Prefect's TerminationSignal, in a flow run a worker or ``serve``
    started, lands wherever the main thread is) leaves that write's SQLite transaction open, since
    MLflow's session rolls back on ``Exception`` only; each MLflow write of the run's unwinding then
    waited out SQLite's busy timeout on that lock (seen in CI: a UI-cancelled daily run was still
    unwinding when the runner's grace ran out, and its lease stayed behind). On its own thread a
    call completes whatever the main thread is interrupted by; the signal lands in the wait. Calls
    are serialised in the order made, so a write that follows an interrupted one waits for it."""

    def __init__(self, uri: str | None):
        self._uri = uri

    def __getattr__(self, name: str) -> Any:
        method = getattr(MlflowClient, name)       # AttributeError here for a name MlflowClient lacks
        if not callable(method):
            raise AttributeError(name)
        uri = self._uri

        def call(*args: Any, **kwargs: Any) -> Any:
            stops_before = len(recorded_stops())
            done = _mlflow_thread().submit(lambda: getattr(_thread_client(uri), name)(*args, **kwargs))
            try:
                while True:
                    try:
                        return done.result(timeout=STOP_POLL_S)
                    except FutureTimeout:
                        # A qarm command's handler only records a stop that comes while its caller
                        # waits in here (not an interruptible frame): raise it, or Ctrl-C against a
                        # slow tracking server would wait out the request. A stop recorded before
                        # the call (the unwinding's own writes: naming the stop, ending the run)
                        # lets the call finish.
                        if len(recorded_stops()) > stops_before:
                            raise_if_stopped()
            except BaseException:
                if not done.done():     # the caller was interrupted: the call goes on; say if it fails
                    done.add_done_callback(functools.partial(_warn_if_failed, name))
                raise
        return call


def _warn_if_failed(name: str, done: Future) -> None:
    if done.exception() is not None:
        logging.getLogger(__name__).warning("MLflow %s, left running by an interrupted caller, failed: %s",
                                            name, done.exception())


class _MlflowThread:
    """One daemon thread running submitted calls in order. A daemon: a call left running by an
    interrupted caller (a stop) must not hold the process at exit (a thread pool's worker is joined
    at exit: minutes, against an unreachable tracking server); every call that matters has a caller
    waiting for it."""

    def __init__(self) -> None:
        import queue

        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        threading.Thread(target=self._run, name="qarm-mlflow", daemon=True).start()

    def submit(self, fn: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:    # noqa: BLE001 -- handed to the caller
                fut.set_exception(exc)


_MLFLOW_THREAD: dict[int, _MlflowThread] = {}
_MLFLOW_THREAD_LOCK = threading.Lock()
# The MLflow thread's clients, by tracking URI (used on that thread only; MLflow caches the stores).
_CLIENTS: dict[str | None, MlflowClient] = {}


def _thread_client(uri: str | None) -> MlflowClient:
    if uri not in _CLIENTS:
        _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


def _mlflow_thread() -> _MlflowThread:
    """This process's one MLflow thread (a new one after a fork: a forked child has no threads)."""
    import os

    pid = os.getpid()
    with _MLFLOW_THREAD_LOCK:
        if pid not in _MLFLOW_THREAD:
            _MLFLOW_THREAD.clear()
            _CLIENTS.clear()
            _MLFLOW_THREAD[pid] = _MlflowThread()
        return _MLFLOW_THREAD[pid]


# MLflow 3 opens an experiment without this tag in its GenAI view (traces); ours are model runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(cfg: PipelineConfig) -> str:
    """The configured experiment's id, created (tagged ``EXPERIMENT_KIND``) on first use."""
    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        try:
            return client.create_experiment(cfg.tracking.experiment, artifact_location=cfg.tracking.artifact_location,
                                            tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:  # created concurrently by another run
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
    for k, v in EXPERIMENT_KIND.items():           # experiments made before the tag existed
        if exp.tags.get(k) != v:
            client.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


# A refresh's headline: the stage metrics that are copied onto the flow's parent run as
# ``<stage>.<metric>``, so that MLflow's runs table and compare view show refreshes side by side
# (the rank-train flow adds ``rank.<model>.auc`` / ``.gauc`` to the refresh whose snapshot it read).
HEADLINE = {
    "mine": re.compile(r"u2i\.recall_two_tower"),
    "judge": re.compile(r"auc\.\w+|\w+\.rejection_rate|\w+\.valid\.auc"),
    "embed": re.compile(r"valid\.\w+\.recall_at_10"),
    "quantize": re.compile(r"(raw|resolved)\.collision_rate|raw\.decode_hr_at_(1|10)|(raw|resolved)\.edge_num"
                           r"|churn|lineage\.prefix_churn|fsq\.refit|level\d\.utilisation"),
}
# the prefix of what the rank-train flow adds to a refresh's run: rank.<model>.auc / .gauc
RANK_HEADLINE = "rank."


def headline_of(metrics: dict[str, float]) -> dict[str, float]:
    """The headline entries (``<stage>.<metric>`` of a ``HEADLINE`` stage, or ``rank.*``) of a parent
    run's metrics."""
    prefixes = tuple(f"{stage}." for stage in HEADLINE) + (RANK_HEADLINE,)
    return {k: v for k, v in metrics.items() if k.startswith(prefixes)}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_METRIC_CHARS = re.compile(r"[^0-9A-Za-z_\-. :/]")


def metric_name(key: str) -> str:
    """``key`` as MLflow accepts it: ``hr@10`` -> ``hr_at_10``, other characters -> ``_``."""
    return _METRIC_CHARS.sub("_", key.replace("@", "_at_"))


@dataclass
class StageRun:
    """Handle passed to a task for logging into its nested MLflow run."""

    client: "MlflowCalls"
    run_id: str
    stage: str = ""
    headline_to: str | None = None      # the parent run that gets this stage's ``HEADLINE`` metrics

    # One request per batch of values, not one per value: a refresh logs ~250 config params per
    # stage run, and one log_param each took 1.4 s of a 3.2 s failed ingest (the sqlite store commits
    # every call). MLflow's per-request limits: 100 params, 100 tags, 1000 metrics.
    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        ps = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in flatten(params).items()]
        for lo in range(0, len(ps), 100):
            self.client.log_batch(self.run_id, params=ps[lo:lo + 100])

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(metric_name(k), float(v), ts, step) for k, v in metrics.items()]
        for lo in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[lo:lo + 1000])
        pattern = HEADLINE.get(self.stage)
        if self.headline_to and pattern is not None:
            top = [Metric(f"{self.stage}.{m.key}", m.value, ts, step) for m in ms if pattern.fullmatch(m.key)]
            if top:
                self.client.log_batch(self.headline_to, metrics=top)

    def tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        ts = [RunTag(k, str(v)) for k, v in tags.items()]
        for lo in range(0, len(ts), 100):
            self.client.log_batch(self.run_id, tags=ts[lo:lo + 100])

    def json(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def gate(self, result: GateResult) -> None:
        ds = result.dataset
        self.metrics({f"gate.{ds}.success": float(result.success),
                      f"gate.{ds}.failed_checks": float(len(result.failures)),
                      f"gate.{ds}.rows": float(result.rows)})
        for c in result.failures:
            self.metrics({f"gate.{ds}.{c.expectation}.unexpected": float(c.unexpected_count)})
        self.json(result.to_dict(), f"gates/{ds}.json")


def describe_error(exc: BaseException, limit: int = 5000) -> str:
    """``Type: message`` cut to ``limit`` characters, led by ``stopped by SIGTERM:`` when a signal
    stopped the run (Prefect's TerminationSignal carries no message; see ``stop_signal_name`` for
    why the chain is searched). The signal comes first so that cutting a long message never drops it."""
    text = f"{type(exc).__name__}: {exc}"
    sig = stop_signal_name(exc)
    if sig is not None and STOPPED_BY not in text[:200]:
        text = f"{STOPPED_BY}{sig}: {text}"
    return _cut(text, limit)


def _end_run(handle: StageRun, status: str, error: str | None) -> None:
    """Tag the error and end the run, each write tried twice: a signal may have interrupted the
    tracking store mid-write (its first call after that can fail), and a run left RUNNING or
    FAILED without its reason is what an operator cannot explain later."""
    writes = ([lambda: handle.tags({"qarm.error": error})] if error is not None else []) + \
        [lambda: handle.client.set_terminated(handle.run_id, status)]
    for write in writes:
        for attempt in (1, 2):
            try:
                write()
                break
            except Exception:  # noqa: BLE001 -- the run's own error is what propagates
                if attempt == 2:
                    logging.getLogger(__name__).warning("could not record the end of MLflow run %s",
                                                        handle.run_id, exc_info=True)


# The runs this process ended FAILED, with the error each recorded (the last 100): when the command
# then learns that a signal stopped it (flows/cli.py), ``name_the_stop`` names it on them.
_FAILED_RUNS: list[tuple[StageRun, str]] = []


def name_the_stop(signal_name: str) -> int:
    """Lead ``qarm.error`` of every run this process ended FAILED with ``stopped by <signal>:``
    where it does not say so yet (the error the run saw was raised while the signal was being
    handled, e.g. by an extension's C code, without the signal in its chain). Returns how many."""
    n = 0
    for handle, error in _FAILED_RUNS:
        if STOPPED_BY not in error[:200]:
            handle.tags({"qarm.error": _cut(f"{STOPPED_BY}{signal_name}: {error}")})
            n += 1
    _FAILED_RUNS.clear()
    return n


def _cut(text: str, limit: int = 5000) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _timed(handle: StageRun) -> Iterator[StageRun]:
    """Record the run's duration; end it FINISHED, or FAILED with the error in ``qarm.error``."""
    t0 = time.time()
    error = None
    try:
        yield handle
    except BaseException as exc:
        error = describe_error(exc)
        _FAILED_RUNS.append((handle, error))
        del _FAILED_RUNS[:-100]
        raise
    finally:
        try:
            handle.metrics({"duration_s": time.time() - t0})
        except Exception:  # noqa: BLE001 -- see _end_run
            logging.getLogger(__name__).warning("could not log the duration of MLflow run %s", handle.run_id,
                                                exc_info=True)
        _end_run(handle, RunStatus.to_string(RunStatus.FAILED if error is not None else RunStatus.FINISHED), error)


@functools.lru_cache(maxsize=1)
def source_tags(repo: Path | None = None) -> dict[str, str]:
    """MLflow's source tags for runs of this checkout (``repo``: the repository root): the git
    commit (``mlflow.source.git.commit``, what the runs table's Source/Version columns show) and
    whether the tree had local changes. Outside a git checkout (a container image: .git stays out of
    its build context) the commit the image was built from, ``QARM_GIT_COMMIT``, if given; else empty."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1] if repo is None else Path(repo)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        built_from = os.environ.get("QARM_GIT_COMMIT", "").strip()
        return {"mlflow.source.git.commit": built_from, "qarm.git.dirty": "unknown"} if built_from else {}
    return {"mlflow.source.git.commit": commit, "qarm.git.dirty": str(bool(dirty)).lower()}


def run_name(flow_name: str, config_name: str, overrides: dict[str, Any] | None, trigger: str | None) -> str:
    """What a flow run was, as its MLflow run name: flow, trigger (the Prefect deployment, else
    ``manual``), config name, overrides; e.g. ``codebook-refresh daily-ml100k ml100k [quantize.mode=warm_start]``."""
    sets = ", ".join(f"{k}={v}" for k, v in sorted((overrides or {}).items()))
    name = f"{flow_name} {trigger or 'manual'} {config_name}" + (f" [{sets}]" if sets else "")
    return name if len(name) <= 250 else name[:247] + "..."


def prefect_tags(config_path: str) -> dict[str, str]:
    """Tags linking an MLflow parent run to the Prefect flow run that made it (id, UI address,
    deployment) and the config file it ran."""
    from prefect.runtime import deployment, flow_run

    return {"prefect.flow_run_id": flow_run.id or "", "prefect.flow_run_url": flow_run.ui_url or "",
            "prefect.deployment": deployment.name or "", "qarm.config_path": config_path}


@contextlib.contextmanager
def flow_run(cfg: PipelineConfig, flow_name: str, tags: dict[str, Any] | None = None,
             name: str | None = None, source: str | None = None) -> Iterator[str]:
    """Open the parent run of a flow run (named ``name``, default the flow's name; ``source``: the
    flow's entrypoint, MLflow's Source column): logs the resolved config; marks FAILED on an exception."""
    from qarm_core.devices import hardware_summary

    _FAILED_RUNS.clear()             # a new flow run: earlier failures in this process are not its own
    client = _client(cfg)
    src = {"mlflow.source.name": source, "mlflow.source.type": "JOB"} if source else {}
    run = client.create_run(experiment_id(cfg), run_name=name or flow_name,
                            tags={"qarm.flow": flow_name, "qarm.hardware": hardware_summary(), **src,
                                  **source_tags(), **{k: str(v) for k, v in (tags or {}).items()}})
    handle = StageRun(client, run.info.run_id)
    handle.params({"config": cfg.to_dict()})
    handle.text(dump_config(cfg), "config/resolved.yaml")
    with _timed(handle):
        yield handle.run_id


@contextlib.contextmanager
def stage_run(cfg: PipelineConfig, parent_run_id: str, stage: str) -> Iterator[StageRun]:
    """A nested run for one stage; records its duration and status."""
    client = _client(cfg)
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=stage,
                            tags={"mlflow.parentRunId": parent_run_id, "qarm.stage": stage})
    with _timed(StageRun(client, run.info.run_id, stage=stage, headline_to=parent_run_id)) as handle:
        yield handle


def runs_of(cfg: PipelineConfig, filter_string: str = "") -> list[dict]:
    """Runs of the configured experiment as plain dicts (for the CLI and tests)."""
    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000)
    return [json.loads(json.dumps({"run_id": r.info.run_id, "name": r.info.run_name,
                                   "status": r.info.status, "tags": r.data.tags,
                                   "metrics": r.data.metrics, "params": r.data.params}))
            for r in runs]


def run_link(cfg: PipelineConfig, run_id: str) -> str:
    """The MLflow UI's address of a run (``tracking.ui_url``, else the tracking URI if it is a
    server, else ``make mlflow-ui``'s http://127.0.0.1:5000)."""
    client = _client(cfg)
    uri = str(cfg.tracking.tracking_uri)
    base = cfg.tracking.ui_url or (redact_uri(uri) if uri.startswith("http") else "http://127.0.0.1:5000")
    return f"{base.rstrip('/')}/#/experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id}"


# The stage tags a summary shows: what a stage chose (how it quantized, what the embed gate kept,
# the judge's keep rules, the numeric type, ...), not every identifier it logged.
DECISION_TAGS = re.compile(r"how|gate|keep_rule|lineage|model_choice|previous|split\.source|^dtype$|error")


def refresh_record(cfg: PipelineConfig, run_id: str) -> dict[str, dict]:
    """What a flow run's MLflow runs hold for its summary: ``headline`` (the parent's
    ``<stage>.<metric>`` metrics), ``gates`` (``<stage>/<dataset>`` -> passed, from every stage run's
    ``gate.<dataset>.success``) and ``notes`` (the stages' ``qarm.*`` decision tags)."""
    client = _client(cfg)
    parent = client.get_run(run_id)
    headline = headline_of(parent.data.metrics)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                                  max_results=1000)
    gates, notes = {}, {}
    for r in children:
        stage = r.data.tags.get("qarm.stage", r.info.run_name)
        for k, v in r.data.metrics.items():
            if k.startswith("gate.") and k.endswith(".success"):
                dataset = k[len("gate."):-len(".success")]
                # gate runs are named gate-<stage>-<dataset>; stage runs also run gates of their own
                gates[f"{stage.removeprefix('gate-').removesuffix('-' + dataset)}/{dataset}"] = bool(v)
        notes.update({f"{stage}: {k[5:]}": v for k, v in r.data.tags.items()
                      if k.startswith("qarm.") and DECISION_TAGS.search(k[5:])})
    return {"headline": headline, "gates": gates, "notes": notes}


def headline_runs(cfg: PipelineConfig, run_ids: list[str] | None = None, last: int = 5,
                  flow_name: str = "codebook-refresh") -> list[dict]:
    """``run_ids``' parent runs, else the ``last`` runs of ``flow_name`` in the configured experiment
    (newest first), each as ``{run_id, name, status, start, commit, headline}`` (headline with the
    run's ``duration_s``)."""
    client = _client(cfg)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`qarm.flow` = '{flow_name}'", max_results=last,
            order_by=["attributes.start_time DESC"])
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
             "start": time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.info.start_time / 1000)),
             "commit": r.data.tags.get("mlflow.source.git.commit", "")[:10],
             "headline": headline_of(r.data.metrics)
             | ({"duration_s": r.data.metrics["duration_s"]} if "duration_s" in r.data.metrics else {})}
            for r in runs]


def log_file(handle: StageRun, local_path, artifact_path: str | None = None) -> None:
    """Upload a local file (e.g. a PNG of training curves) as an artifact of the run."""
    handle.client.log_artifact(handle.run_id, str(local_path), artifact_path)


def log_plot(handle: StageRun, plot, *args, name: str, folder: str = "plots", **kwargs) -> None:
    """Draw ``plot(*args, path, **kwargs)`` (a ``qarm_core.plots`` function) into a temporary PNG
    called ``name`` and log it under ``folder`` of the run."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        log_file(handle, plot(*args, Path(tmp) / name, **kwargs), folder)


def metric_curves(handle: StageRun, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """The logged history of ``keys`` on the run as (step, value) points (empty where not logged)."""
    return {k: [(m.step, m.value) for m in handle.client.get_metric_history(handle.run_id, k)] for k in keys}


def run_handle(cfg: PipelineConfig, run_id: str) -> StageRun:
    """A logging handle on an existing run (e.g. the flow's parent run, from a task)."""
    return StageRun(_client(cfg), run_id)


def close_abandoned_run(cfg: PipelineConfig, run_id: str, why: str) -> int:
    """Mark ``run_id`` and its nested runs FAILED where they are still RUNNING (their process died:
    a SIGKILL or a lost host never ends its runs); ``why`` goes into ``qarm.error``. Returns how
    many runs were closed."""
    client = _client(cfg)
    closed = 0
    try:
        runs = [client.get_run(run_id)]
    except mlflow.exceptions.MlflowException:     # the dead run never reached MLflow
        return 0
    runs += client.search_runs([runs[0].info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)
    for r in runs:
        if r.info.status == "RUNNING":
            client.set_tag(r.info.run_id, "qarm.error", why[:5000])
            client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            closed += 1
    return closed
