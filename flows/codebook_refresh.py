"""The ``codebook-refresh`` flow: ingest -> gate -> mine pairs -> gate -> judge -> gate -> QA -> gate -> publish
(later stages join here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run as prefect_flow_run

from qarm_core.config import load_config
from tasks import tracking
from tasks.gate import gate
from tasks.ingest import ingest
from tasks.judge import judge, qa
from tasks.mine import mine
from tasks.publish import publish

# Absolute, so the default works from any working directory (and in a Prefect deployment).
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "ml100k.yaml")


@flow(name="codebook-refresh")
def codebook_refresh(config_path: str = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None) -> dict:
    """Refresh the published snapshot from the configured source.

    ``overrides``: dotted config keys, e.g. ``{"ingest.source": "synth"}`` (the Prefect UI's way to
    rerun with a change). Returns a summary: snapshot id, row counts, MLflow parent run id.
    """
    cfg = load_config(config_path, overrides).resolved()
    retry = dict(retries=cfg.flow.task_retries, retry_delay_seconds=cfg.flow.task_retry_delay_seconds)
    with tracking.flow_run(cfg, "codebook-refresh",
                           tags={"prefect.flow_run_id": prefect_flow_run.id or "",
                                 "qarm.config_path": config_path}) as run_id:
        records = ingest.with_options(**retry)(cfg, run_id)
        gate(cfg, run_id, "ingest", records["items"])
        gate(cfg, run_id, "ingest", records["interactions"], catalog=records["items"])
        records |= mine(cfg, run_id, records["interactions"], records["items"])
        gate(cfg, run_id, "mine", records["pairs"], catalog=records["items"])
        records |= judge(cfg, run_id, records["pairs"], records["items"], records["interactions"])
        gate(cfg, run_id, "judge", records["judgments"], catalog=records["items"], pairs=records["pairs"])
        records |= qa(cfg, run_id, records["judgments"], records["items"])
        gate(cfg, run_id, "qa", records["qa"], catalog=records["items"])
        snapshot = publish.with_options(**retry)(cfg, run_id, records)
    return {"snapshot_id": snapshot.snapshot_id, "snapshot_path": snapshot.path, "mlflow_run_id": run_id,
            "rows": {n: r.rows for n, r in records.items()}}
