"""Publish task: make the gated datasets the current snapshot, atomically."""

from __future__ import annotations

import re

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from qarm_core.config import PipelineConfig
from qarm_core.errors import raise_if_stopped
from qarm_core.scratch import ObjectScratch
from qarm_core.storage import DatasetRecord, Snapshot, Storage
from qarm_core.summary import refresh_summary_markdown
from tasks import tracking
from tasks.common import TASK_DEFAULTS


@task(name="publish", **TASK_DEFAULTS)
def publish(cfg: PipelineConfig, parent_run_id: str, records: dict[str, DatasetRecord],
            parent_snapshot: str | None | bool = False) -> Snapshot:
    """Publish ``records``; ``parent_snapshot``: the snapshot id the run started from (None: none),
    which CURRENT must still name (``Storage.publish``'s ``expect_parent``). Nothing is published
    once a stop signal arrived, even one whose exception was swallowed where it landed."""
    raise_if_stopped()
    storage = Storage(cfg.home)
    with tracking.stage_run(cfg, parent_run_id, "publish") as run:
        snap = storage.publish(records, meta={"mlflow_run_id": parent_run_id, "config": cfg.to_dict(),
                                              "config_fingerprint": cfg.fingerprint(),
                                              "parent_snapshot": parent_snapshot or None},
                               retention=cfg.storage.retention, publish_key=parent_run_id,
                               expect_parent=parent_snapshot)
        kept = {str(r.path) for r in records.values()}
        pruned_work = storage.prune_work(cfg.storage.work_ttl_hours,
                                         keep={str(p) for p in _stage_roots(kept)})
        # shard scratch on the store that failed or killed runs left (qarm_core.scratch)
        swept = ObjectScratch(cfg.home).sweep(cfg.storage.work_ttl_hours * 3600) if storage.remote else 0
        run.params({"snapshot_id": snap.snapshot_id})
        run.metrics({f"rows.{n}": r.rows for n, r in records.items()} |
                    {"snapshots_kept": len(storage.list_snapshots()), "work_pruned": pruned_work,
                     "scratch_swept": swept})
        run.json(snap.manifest, "manifest.json")
        get_run_logger().info("published snapshot %s at %s", snap.snapshot_id, snap.path)
    return snap


@task(name="summarize", **TASK_DEFAULTS)
def summarize(cfg: PipelineConfig, parent_run_id: str, snapshot: Snapshot, title: str = "codebook refresh") -> str:
    """The run's one-page summary (snapshot, headline metrics, gates, decisions, rows, MLflow link)
    as a Prefect markdown artifact of the flow run and ``summary.md`` on the MLflow run; returns it."""
    rec = tracking.refresh_record(cfg, parent_run_id)
    rows = {n: int(d.get("rows", 0)) for n, d in snapshot.manifest["datasets"].items()}
    link = tracking.run_link(cfg, parent_run_id)
    text = refresh_summary_markdown(snapshot.snapshot_id, rows, rec["headline"], rec["gates"], rec["notes"],
                                    link, title)
    tracking.run_handle(cfg, parent_run_id).text(text, "summary.md")
    # the artifact key allows lowercase letters, digits and dashes only
    key = re.sub(r"[^a-z0-9-]+", "-", f"{cfg.name}-{title}-summary".lower()).strip("-")
    create_markdown_artifact(markdown=text, key=key, description=f"{title} {snapshot.snapshot_id}")
    get_run_logger().info("summary: %d headline metrics, %d gates (%d failed); MLflow run %s",
                          len(rec["headline"]), len(rec["gates"]), sum(not v for v in rec["gates"].values()), link)
    return text


def _stage_roots(paths: set[str]) -> set[str]:
    """The work/<stage>/<key> folders holding these dataset folders."""
    from pathlib import Path
    return {str(Path(p).parent) for p in paths}
