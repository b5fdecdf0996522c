"""Every MLflow call qarm makes lives here.

One parent run per flow run, one nested run per stage. Runs are created through ``MlflowClient``
with explicit run ids (not MLflow's thread-local active run), because Prefect may run tasks on
worker threads.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from qarm_core.config import PipelineConfig, dump_config
from qarm_core.errors import STOPPED_BY, stop_signal_name
from qarm_core.gates import GateResult

_MAX_PARAM_CHARS = 6000


def _client(cfg: PipelineConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.tracking.tracking_uri)


def experiment_id(cfg: PipelineConfig) -> str:
    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(cfg.tracking.experiment,
                                        artifact_location=cfg.tracking.artifact_location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another run
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


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

    client: MlflowClient
    run_id: str

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


def describe_error(exc: BaseException) -> str:
    """``Type: message``, plus ``(stopped by SIGTERM)`` when a signal stopped the run (Prefect's
    TerminationSignal carries no message; see ``stop_signal_name`` for why the chain is searched)."""
    text = f"{type(exc).__name__}: {exc}"
    sig = stop_signal_name(exc)
    if sig is not None and STOPPED_BY not in text:
        text += f" ({STOPPED_BY}{sig})"
    return text


@contextlib.contextmanager
def _timed(handle: StageRun) -> Iterator[StageRun]:
    """Record the run's duration; end it FINISHED, or FAILED with the error in ``qarm.error``."""
    t0 = time.time()
    status = RunStatus.FINISHED
    try:
        yield handle
    except BaseException as exc:
        status = RunStatus.FAILED
        handle.tags({"qarm.error": describe_error(exc)[:5000]})
        raise
    finally:
        handle.metrics({"duration_s": time.time() - t0})
        handle.client.set_terminated(handle.run_id, RunStatus.to_string(status))


@contextlib.contextmanager
def flow_run(cfg: PipelineConfig, flow_name: str, tags: dict[str, Any] | None = None) -> Iterator[str]:
    """Open the parent run of a flow run: logs the resolved config; marks FAILED on an exception."""
    from qarm_core.devices import hardware_summary

    client = _client(cfg)
    run = client.create_run(experiment_id(cfg), run_name=flow_name,
                            tags={"qarm.flow": flow_name, "qarm.hardware": hardware_summary(),
                                  **{k: str(v) for k, v in (tags or {}).items()}})
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
    with _timed(StageRun(client, run.info.run_id)) as handle:
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


def log_file(handle: StageRun, local_path, artifact_path: str | None = None) -> None:
    """Upload a local file (e.g. a PNG of training curves) as an artifact of the run."""
    handle.client.log_artifact(handle.run_id, str(local_path), artifact_path)


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
