"""The ``ingest`` flow: ingest -> gate items -> gate interactions (against the items) -> publish.

What it publishes (an *inputs* snapshot): the new ``interactions`` and ``items``, and, carried over
unchanged from the snapshot that was current (``tasks.ingest.CARRIED``), what the next refresh reuses: the judge
and QA caches, the embedding model, the u2i miner's towers, the embeddings and the Semantic IDs (codebook and codes), so
that ingesting new data never resets the SIDs consumers hold nor the work a refresh can reuse. It
holds no time split (``periods``, ``train_events``, ``valid_events``) nor mined ``pairs``: those
belong to the log they were computed from. So rank-train and evaluate, which need the split, refuse
it with an error naming ``periods`` (run a refresh first), and ``qarm status`` marks it "inputs
only". The refresh that follows reads the published inputs with ``ingest.source: published``::

    qarm ingest --interactions FILE --items FILE      # gate and publish the new data
    qarm refresh --set ingest.source=published        # split, mine, judge, ... from it; publish all

Same conventions as the refresh: the home's lease (one refresh or ingest at a time), one MLflow
parent run with a nested run per task, publish refused if CURRENT moved meanwhile.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import deployment as prefect_deployment
from prefect.runtime import flow_run as prefect_flow_run

from flows.options import DEFAULT_CONFIG
from qarm_core.config import load_config
from qarm_core.errors import ConfigError
from tasks import tracking
from tasks.common import adopt_run, current_snapshot_id, exclusive_home, flow_stop_signals, route_core_logs
from tasks.gate import gate
from tasks.ingest import DATASETS, carry_over, ingest as ingest_task
from tasks.publish import publish, summarize

FLOW = "ingest"
# MLflow's Source column for this flow's runs.
ENTRYPOINT = "flows/ingest.py:ingest"


@flow(name=FLOW)
def ingest(config_path: str = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None) -> dict:
    """Ingest the configured source (``ingest.source``: ml100k, files or synth), gate it and publish it
    as an inputs snapshot (the module's docstring says what it holds).

    Returns a summary: snapshot id and path, MLflow parent run id, the rows of the new datasets and
    of those carried over, and the snapshot they were carried from.
    """
    route_core_logs()
    with flow_stop_signals():     # first: who ends the run on a stop signal (tasks.common)
        cfg = load_config(config_path, overrides).resolved()
        if cfg.ingest.source == "published":
            raise ConfigError("ingest.source 'published' reads what is already published: nothing new to ingest "
                              "(choose ml100k, files or synth)")
        retry = dict(retries=cfg.flow.task_retries, retry_delay_seconds=cfg.flow.task_retry_delay_seconds)
        name = tracking.run_name(FLOW, cfg.name, overrides, prefect_deployment.name)
        with exclusive_home(cfg, FLOW) as lease, \
                tracking.flow_run(cfg, FLOW, name=name, source=ENTRYPOINT,
                                  tags=tracking.prefect_tags(config_path)) as run_id:
            adopt_run(cfg, lease, run_id, str(prefect_flow_run.id or ""))
            parent = current_snapshot_id(cfg)
            records = ingest_task.with_options(**retry)(cfg, run_id, parent)
            gate(cfg, run_id, "ingest", records["items"])
            gate(cfg, run_id, "ingest", records["interactions"], catalog=records["items"])
            carried = carry_over(cfg, parent)
            lease.check()
            snapshot = publish.with_options(**retry)(cfg, run_id, {**carried, **records}, parent)
            summarize(cfg, run_id, snapshot, title="ingest")
        return {"snapshot_id": snapshot.snapshot_id, "snapshot_path": snapshot.path, "mlflow_run_id": run_id,
                "rows": {n: records[n].rows for n in DATASETS}, "carried": {n: r.rows for n, r in carried.items()},
                "carried_from": parent if carried else None}
