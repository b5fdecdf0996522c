"""Publish task: make the gated datasets the current snapshot, atomically."""

from __future__ import annotations

from prefect import get_run_logger, task

from qarm_core.config import PipelineConfig
from qarm_core.storage import DatasetRecord, Snapshot, Storage
from tasks import tracking
from tasks.common import TASK_DEFAULTS


@task(name="publish", **TASK_DEFAULTS)
def publish(cfg: PipelineConfig, parent_run_id: str, records: dict[str, DatasetRecord],
            parent_snapshot: str | None | bool = False) -> Snapshot:
    """Publish ``records``; ``parent_snapshot``: the snapshot id the run started from (None: none),
    which CURRENT must still name (``Storage.publish``'s ``expect_parent``)."""
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
        run.params({"snapshot_id": snap.snapshot_id})
        run.metrics({f"rows.{n}": r.rows for n, r in records.items()} |
                    {"snapshots_kept": len(storage.list_snapshots()), "work_pruned": pruned_work})
        run.json(snap.manifest, "manifest.json")
        get_run_logger().info("published snapshot %s at %s", snap.snapshot_id, snap.path)
    return snap


def _stage_roots(paths: set[str]) -> set[str]:
    """The work/<stage>/<key> folders holding these dataset folders."""
    from pathlib import Path
    return {str(Path(p).parent) for p in paths}
