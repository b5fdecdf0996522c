"""Gate task: validate one dataset on a DAG edge; stop the flow when it fails."""

from __future__ import annotations

from prefect import get_run_logger, task

from qarm_core.config import PipelineConfig
from qarm_core.gates import GateResult, run_gate
from qarm_core.storage import DatasetRecord, Storage
from tasks import tracking
from tasks.common import TASK_DEFAULTS


@task(name="gate", task_run_name="gate-{stage}-{record.dataset}", **TASK_DEFAULTS)
def gate(cfg: PipelineConfig, parent_run_id: str, stage: str, record: DatasetRecord,
         catalog: DatasetRecord | None = None, pairs: DatasetRecord | None = None,
         expect: dict | None = None) -> GateResult:
    """Run the dataset's suite; raises ``GateError`` (naming stage, dataset, expectation and
    offending rows) if any check fails. Results go to MLflow either way."""
    storage = Storage(cfg.home)
    with tracking.stage_run(cfg, parent_run_id, f"gate-{stage}-{record.dataset}") as run:
        result = run_gate(stage, record, cfg.gates, cfg.duckdb, storage.duckdb_temp_dir,
                          catalog=catalog, pairs=pairs, expect=expect)
        run.gate(result)
        get_run_logger().info("gate %s/%s: %s (%d checks, %d failed)", stage, record.dataset,
                              "passed" if result.success else "FAILED", len(result.checks),
                              len(result.failures))
        result.raise_if_failed()
    return result
