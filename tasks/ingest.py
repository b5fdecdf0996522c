"""Ingest task: read the configured source into staged interactions/items datasets."""

from __future__ import annotations

from prefect import get_run_logger, task

from qarm_core import __version__
from qarm_core.config import PipelineConfig
from qarm_core.hashing import stable_hash
from qarm_core.ingest import resolve_source
from qarm_core.schemas import SCHEMAS
from qarm_core.storage import DatasetRecord, Storage, write_stage_outputs
from tasks import tracking
from tasks.common import TASK_DEFAULTS


@task(name="ingest", **TASK_DEFAULTS)
def ingest(cfg: PipelineConfig, parent_run_id: str) -> dict[str, DatasetRecord]:
    """Stage the source as ``interactions`` and ``items``; reuses a staged copy of the same input."""
    log = get_run_logger()
    storage = Storage(cfg.home).ensure()
    with tracking.stage_run(cfg, parent_run_id, "ingest") as run:
        source_fp, batches = resolve_source(cfg.ingest)
        key = stable_hash({"source": source_fp, "ingest": cfg.ingest.source, "qarm": __version__,
                           "schemas": {n: SCHEMAS[n].version for n in batches}})
        records, reused, _ = write_stage_outputs(
            storage, "ingest", key, {name: (SCHEMAS[name], fn) for name, fn in batches.items()})
        run.params({"source": cfg.ingest.source, "source_fingerprint": source_fp, "key": key})
        run.metrics({f"rows.{n}": r.rows for n, r in records.items()} | {"reused": float(reused)})
        run.json({n: r.to_dict() for n, r in records.items()}, "records.json")
        log.info("ingest %s: %s (%s)", cfg.ingest.source,
                 ", ".join(f"{n}={r.rows:,} rows" for n, r in records.items()),
                 "reused staged output" if reused else "written")
    return records
