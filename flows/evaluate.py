"""The ``evaluate`` flow: the whole evaluation of the published snapshot in one MLflow run:
inputs -> embeddings -> judge -> quantizer -> ranking (optional) -> report.md + PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import deployment as prefect_deployment

from flows.options import DEFAULT_CONFIG
from flows.rank_train import rank_comparison
from qarm_core.config import load_config
from qarm_core.errors import DataError
from qarm_core.storage import check_output
from tasks import tracking
from tasks.common import flow_stop_signals, route_core_logs
from tasks.evaluate import evaluate_embeddings, evaluate_judge, evaluate_quantizer, evaluation_inputs, write_report
from tasks.rank import read_pool_files

# MLflow's Source column for this flow's runs.
ENTRYPOINT = "flows/evaluate.py:evaluate"


def check_pool_with(pool_with: list[str] | None, rank: bool) -> None:
    """Refuse ``pool_with`` without the ranking section, or naming a file that is not a comparison's
    test scores (before any work: the flow and the CLI, before Prefect starts, call it)."""
    if pool_with:
        if not rank:
            raise DataError("evaluate", "pool_with", "--pool-with pools this run's ranking comparison with earlier "
                                                     "ones: it needs the ranking section (drop --no-rank)")
        read_pool_files(pool_with, "evaluate")


@flow(name="evaluate")
def evaluate(config_path: str = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None, rank: bool = True,
             out_dir: str | None = None, command: str = "qarm evaluate", overwrite: bool = False,
             pool_with: list[str] | None = None) -> dict:
    """Evaluate the published snapshot on its held-out periods; returns the sections, the report's
    path and the MLflow run id. ``rank``: also train and compare the ranking models (the longest part).
    ``out_dir``: a folder for the report, refused before any work unless it is new, or an earlier
    qarm output and ``overwrite``. ``pool_with``: earlier comparisons' ``rank/test_scores.npz`` on the
    same ranking samples (e.g. other pipeline seeds' snapshots), pooled with this one into the
    report's "Ranking, pooled" section; read before any work."""
    route_core_logs()
    with flow_stop_signals():     # first: who ends the run on a stop signal (tasks.common)
        cfg = load_config(config_path, overrides).resolved()
        if out_dir:
            check_output(Path(out_dir), "folder", overwrite, "evaluate")
        check_pool_with(pool_with, rank)
        with tracking.flow_run(cfg, "evaluate", tags=tracking.prefect_tags(config_path), source=ENTRYPOINT,
                               name=tracking.run_name("evaluate", cfg.name, overrides, prefect_deployment.name)) as run_id:
            inputs = evaluation_inputs(cfg)
            sections: dict = {"embeddings": evaluate_embeddings(cfg, run_id, inputs)}
            sections["judge"], sections["judge_ablation"] = evaluate_judge(cfg, run_id, inputs)
            sections["quantizer"] = evaluate_quantizer(cfg, run_id, inputs)
            if rank:
                ranking = rank_comparison(cfg, run_id, pool_with=pool_with)
                sections["ranking"] = ranking["table"]
                if "pooled" in ranking:
                    sections["ranking_pooled"] = ranking["pooled"]
            report = write_report(cfg, run_id, inputs, sections, command, out_dir, overwrite)
        return {"mlflow_run_id": run_id, "report": report, "snapshot_id": inputs["snapshot_id"], "sections": sections}
