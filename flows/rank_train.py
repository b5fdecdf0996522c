"""The ``rank-train`` flow: inputs -> samples -> gate -> prepare -> train each model -> compare.

Run it after a codebook refresh (it reads the published snapshot's interactions and items, and its
embeddings and codes when there are any) or by hand with explicit ``embeddings_path``/``codes_path``.
Without embeddings/codes it fails with a DataError, unless ``rank.inputs_fallback: minilm``, which
embeds the catalog text with MiniLM and quantizes it inside the flow (staged, reused next time).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import deployment as prefect_deployment

from flows.options import DEFAULT_CONFIG
from qarm_core.config import load_config
from tasks import tracking
from tasks.common import flow_stop_signals, route_core_logs
from tasks.rank import (check_pool_samples, rank_compare, rank_gate, rank_inputs, rank_pool, rank_prepare, rank_samples,
                        rank_train_model, read_pool_files)


# MLflow's Source column for this flow's runs.
ENTRYPOINT = "flows/rank_train.py:rank_train"


@flow(name="rank-train")
def rank_train(config_path: str = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None,
               models: list[str] | None = None, embeddings_path: str | None = None,
               codes_path: str | None = None, pool_with: list[str] | None = None) -> dict:
    """Train and compare the ranking models (``models`` or ``rank.models``) on the same samples.

    Returns the comparison table (one row per model: AUC/GAUC/logloss mean and std over the seeds),
    the samples report and the MLflow run id of the flow (each model has a nested run ``rank-<model>``);
    with ``pool_with`` (earlier comparisons' ``rank/test_scores.npz`` on the same samples, e.g. other
    pipeline seeds' snapshots) also ``pooled``: every comparison in one paired bootstrap.
    """
    route_core_logs()
    with flow_stop_signals():     # first: who ends the run on a stop signal (tasks.common)
        overrides = dict(overrides or {})
        if models:
            overrides["rank.models"] = list(models)
        cfg = load_config(config_path, overrides).resolved()
        if cfg.rank.experiment:
            cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"experiment": cfg.rank.experiment})})
        with tracking.flow_run(cfg, "rank-train", tags=tracking.prefect_tags(config_path), source=ENTRYPOINT,
                               name=tracking.run_name("rank-train", cfg.name, overrides, prefect_deployment.name)) as run_id:
            out = rank_comparison(cfg, run_id, embeddings_path, codes_path, pool_with)
        return {"mlflow_run_id": run_id, **out}


def rank_comparison(cfg: Any, run_id: str, embeddings_path: str | None = None, codes_path: str | None = None,
                    pool_with: list[str] | None = None) -> dict:
    """The ranking tasks in order (also wired into the evaluate flow): the comparison table, the
    samples report and where the item inputs came from; with ``pool_with`` (earlier comparisons'
    ``test_scores.npz``, refused before any training if unreadable or on other samples) also
    ``pooled``, this comparison and those in one bootstrap (``rank_pool``)."""
    pool = read_pool_files(pool_with or [])
    inputs = rank_inputs(cfg, run_id, embeddings_path, codes_path)
    samples = rank_samples(cfg, run_id, inputs)
    rank_gate(cfg, run_id, samples, inputs)
    data = rank_prepare(cfg, run_id, samples, inputs)
    check_pool_samples(data, pool, pool_with or [])
    results = [rank_train_model(cfg, run_id, data, m, inputs) for m in cfg.rank.models]
    table, scores = rank_compare(cfg, run_id, data, results, inputs.get("refresh_run_id"))
    out = {"table": table, "samples": samples["report"], "inputs": {k: str(v) for k, v in inputs["source"].items()}}
    if pool:
        out["pooled"] = rank_pool(cfg, run_id, scores, pool, pool_with)
    return out
