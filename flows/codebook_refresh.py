"""The ``codebook-refresh`` flow: ingest -> gate -> split by time -> gate -> mine pairs (train period) -> gate -> judge -> gate -> QA -> gate ->
train (or reuse the published model) | score the baselines -> embed -> gate -> quantize -> gate -> publish.
With ``qa.items: all``, QA needs no verdicts: judge | QA.

Stages joined by ``|`` do not depend on each other: with ``executor.stages_overlap`` they run at
the same time (``tasks.executor.start``), otherwise one after the other."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import deployment as prefect_deployment
from prefect.runtime import flow_run as prefect_flow_run

from flows.options import DEFAULT_CONFIG
from qarm_core.config import load_config
from qarm_core.embed.train.nodes import check_refresh_node
from tasks import tracking
from tasks.common import adopt_run, current_snapshot_id, exclusive_home, flow_stop_signals, route_core_logs
from tasks.gate import gate
from tasks.embed import baselines, embed, train
from tasks.executor import flow_cluster, start
from tasks.ingest import ingest
from tasks.judge import judge, qa
from tasks.mine import mine
from tasks.publish import publish, summarize
from tasks.split import split
from tasks.quantize import quantize

# MLflow's Source column for this flow's runs.
ENTRYPOINT = "flows/codebook_refresh.py:codebook_refresh"


@flow(name="codebook-refresh")
def codebook_refresh(config_path: str = DEFAULT_CONFIG, overrides: dict[str, Any] | None = None) -> dict:
    """Refresh the published snapshot from the configured source.

    ``overrides``: dotted config keys, e.g. ``{"ingest.source": "synth"}`` (the Prefect UI's way to
    rerun with a change). Returns a summary: snapshot id, row counts, MLflow parent run id.
    """
    route_core_logs()
    with flow_stop_signals():     # first: who ends the run on a stop signal (tasks.common)
        cfg = load_config(config_path, overrides).resolved()
        check_refresh_node(cfg.embed.train)     # one node publishes; the others run `qarm train-node`
        retry = dict(retries=cfg.flow.task_retries, retry_delay_seconds=cfg.flow.task_retry_delay_seconds)
        # One refresh at a time per home; every stage reads the snapshot current now (the parent, pinned:
        # what CURRENT names later does not change what a stage reads), and publish refuses if CURRENT
        # moved meanwhile.
        name = tracking.run_name("codebook-refresh", cfg.name, overrides, prefect_deployment.name)
        with exclusive_home(cfg, "codebook-refresh") as lease, \
                tracking.flow_run(cfg, "codebook-refresh", name=name, source=ENTRYPOINT,
                                  tags=tracking.prefect_tags(config_path)) as run_id, \
                flow_cluster(cfg):      # executor.kind=dask: one local cluster for the run's sharded stages
            adopt_run(cfg, lease, run_id, str(prefect_flow_run.id or ""))
            parent = current_snapshot_id(cfg)
            records = ingest.with_options(**retry)(cfg, run_id, parent)
            gate(cfg, run_id, "ingest", records["items"])
            gate(cfg, run_id, "ingest", records["interactions"], catalog=records["items"])
            # Every stage below learns from the training period only (qarm_core.split).
            records |= split(cfg, run_id, records["interactions"])
            records |= mine(cfg, run_id, records["train_events"], records["items"], parent)
            gate(cfg, run_id, "mine", records["pairs"], catalog=records["items"])
            # QA of every item (qa.items: all) needs no verdicts: it may run beside the judge
            asked = None if cfg.qa.needs_judgments else start(cfg, qa, cfg, run_id, None, records["items"], parent)
            records |= judge(cfg, run_id, records["pairs"], records["items"], records["train_events"],
                             records["valid_events"], parent)
            gate(cfg, run_id, "judge", records["judgments"], catalog=records["items"], pairs=records["pairs"])
            records |= asked.result() if asked else qa(cfg, run_id, records["judgments"], records["items"], parent)
            gate(cfg, run_id, "qa", records["qa"], catalog=records["items"])
            # the baselines of the train -> embed gate need no trained model: they may run beside training
            scored = start(cfg, baselines, cfg, run_id, records["items"], records["train_events"],
                           records["valid_events"], parent)
            records |= train(cfg, run_id, records["judgments"], records["qa"], records["items"], parent)
            baseline_scores = scored.result().get("baseline_scores")
            # the gate: the new model is published only if it beats the published one on validation
            # recall; otherwise embed returns the published model and its embeddings
            records |= embed(cfg, run_id, records["model"], records["items"], records["train_events"],
                             records["valid_events"], baseline_scores, parent)
            gate(cfg, run_id, "embed", records["embeddings"], catalog=records["items"],
                 expect={"dim": cfg.embed.model.dim})
            records |= quantize(cfg, run_id, records["embeddings"], parent)
            gate(cfg, run_id, "quantize", records["codes"], catalog=records["items"],
                 expect={"code_sizes": cfg.quantize.code_sizes})
            lease.check()
            snapshot = publish.with_options(**retry)(cfg, run_id, records, parent)
            summarize(cfg, run_id, snapshot)
        return {"snapshot_id": snapshot.snapshot_id, "snapshot_path": snapshot.path, "mlflow_run_id": run_id,
                "rows": {n: r.rows for n, r in records.items()}}
