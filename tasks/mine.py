"""Mine task: Swing (and two-tower) pairs from the gated interactions."""

from __future__ import annotations

from prefect import get_run_logger, task

from qarm_core import __version__
from qarm_core.config import PipelineConfig
from qarm_core.hashing import stable_hash
from qarm_core.duck import connect
from qarm_core.pairs.mine import load_interactions, mine_pairs
from qarm_core.schemas import PAIRS
from qarm_core.storage import DatasetRecord, Storage, read_dataset, write_stage_outputs
from tasks import tracking
from tasks.common import TASK_DEFAULTS


@task(name="mine-pairs", **TASK_DEFAULTS)
def mine(cfg: PipelineConfig, parent_run_id: str, interactions: DatasetRecord,
         items: DatasetRecord) -> dict[str, DatasetRecord]:
    """Stage ``pairs`` (src_item, dst_item, score, source); reused when inputs and config match."""
    storage = Storage(cfg.home)
    key = stable_hash({"interactions": interactions.fingerprint, "items": items.fingerprint,
                       "mine": cfg.mine.model_dump(mode="json"), "qarm": __version__,
                       "schema": PAIRS.version})
    report: dict = {}

    def produce():
        con = connect(cfg.duckdb, storage.duckdb_temp_dir)
        try:
            events = load_interactions(con, interactions)
        finally:
            con.close()
        catalog = read_dataset(items) if "u2i" in cfg.mine.sources else None
        table, rep = mine_pairs(events, catalog, cfg.mine)
        report.update(rep)
        return iter(table.to_batches(max_chunksize=1_000_000))

    with tracking.stage_run(cfg, parent_run_id, "mine") as run:
        records, reused, report = write_stage_outputs(storage, "mine", key, {"pairs": (PAIRS, produce)}, report)
        run.params({"mine": cfg.mine.model_dump(mode="json"), "key": key})
        run.metrics({**report, "rows.pairs": records["pairs"].rows, "reused": float(reused)})
        get_run_logger().info("mine: %s pairs (%s)", f"{records['pairs'].rows:,}",
                              ", ".join(f"{k}={v:,.0f}" for k, v in report.items() if k.endswith(".pairs")))
    return records
