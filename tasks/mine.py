"""Mine task: Swing (and two-tower) pairs from the training period's events."""

from __future__ import annotations

from prefect import task

from qarm_core.config import PipelineConfig
from qarm_core.duck import connect
from qarm_core.pairs.mine import load_interactions, mine_pairs
from qarm_core.schemas import PAIRS
from qarm_core.storage import DatasetRecord, Storage, read_dataset
from tasks.common import TASK_DEFAULTS, StageSpec, run_stage


@task(name="mine-pairs", **TASK_DEFAULTS)
def mine(cfg: PipelineConfig, parent_run_id: str, events: DatasetRecord,
         items: DatasetRecord) -> dict[str, DatasetRecord]:
    """Stage ``pairs`` (src_item, dst_item, score, source) from ``events`` (the split's
    ``train_events``); reused when inputs and config match."""
    def produce():
        con = connect(cfg.duckdb, Storage(cfg.home).duckdb_temp_dir)
        try:
            log = load_interactions(con, events)
        finally:
            con.close()
        catalog = read_dataset(items) if "u2i" in cfg.mine.sources else None
        table, report = mine_pairs(log, catalog, cfg.mine, cfg.events.positive_min_rating)
        return {"pairs": table}, report

    records, _ = run_stage(cfg, parent_run_id, StageSpec(
        name="mine", outputs={"pairs": PAIRS}, produce=produce,
        key_inputs={"events": events.fingerprint, "items": items.fingerprint,
                    "positive_rule": cfg.events.model_dump(mode="json"), "mine": cfg.mine.model_dump(mode="json")},
        params={"mine": cfg.mine.model_dump(mode="json"), "positive_rule": cfg.events.model_dump(mode="json")},
        summary=lambda recs, rep: "mine: {:,} pairs ({})".format(
            recs["pairs"].rows, ", ".join(f"{k}={v:,.0f}" for k, v in rep.items() if k.endswith(".pairs")))))
    return records
