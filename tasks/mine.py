"""Mine task: Swing (and two-tower) pairs from the training period's events."""

from __future__ import annotations

from prefect import task

from qarm_core.config import PipelineConfig
from qarm_core.duck import connect
from qarm_core.pairs.mine import load_interactions, mine_candidates, select_pairs
from qarm_core.schemas import PAIRS
from qarm_core.storage import CURRENT_AT_READ, DatasetRecord, Storage, read_dataset, write_stage_outputs
from tasks.common import BATCH_ROWS, TASK_DEFAULTS, StageSpec, is_timing, run_stage, stage_key

# The candidates' cache folder (work/<this>/<key>): mined once per input, selected against each
# published snapshot (swing.keep_published_depth).
CANDIDATES_STAGE = "mine-candidates"


@task(name="mine-pairs", **TASK_DEFAULTS)
def mine(cfg: PipelineConfig, parent_run_id: str, events: DatasetRecord,
         items: DatasetRecord, parent: str | None = CURRENT_AT_READ) -> dict[str, DatasetRecord]:
    """Stage ``pairs`` (src_item, dst_item, score, source) from ``events`` (the split's
    ``train_events``); reused when inputs and config match. With ``mine.swing.keep_published_depth``
    the published snapshot's pairs are an input too: the mined candidates (depth x top_k per item)
    are kept apart (reused when only the published pairs changed) and each item keeps its published
    neighbours that are still among them (those of ``parent``, the snapshot the refresh started from)."""
    storage = Storage(cfg.home).as_of(parent)
    mined_from = {"events": events.fingerprint, "items": items.fingerprint,
                  "positive_rule": cfg.events.model_dump(mode="json"), "mine": cfg.mine.model_dump(mode="json")}
    sticky = cfg.mine.swing.keep_published_depth is not None and "swing" in cfg.mine.sources
    # only the record here (its fingerprint is in the key); the table is read if the stage runs
    published_rec = storage.published_cache("pairs") if sticky else None

    def mined():
        con = connect(cfg.duckdb, storage.duckdb_temp_dir)
        try:
            log = load_interactions(con, events)
        finally:
            con.close()
        catalog = read_dataset(items) if "u2i" in cfg.mine.sources else None
        return mine_candidates(log, catalog, cfg.mine, cfg.events.positive_min_rating)

    def produce():
        if not sticky:
            candidates, report = mined()
        else:
            made: dict = {}
            fresh: dict = {}

            def batches():
                made["table"], rep = mined()
                fresh.update(rep)
                return iter(made["table"].to_batches(max_chunksize=BATCH_ROWS))

            key = stage_key(StageSpec(name=CANDIDATES_STAGE, key_inputs=mined_from, outputs={"candidates": PAIRS},
                                      produce=mined))
            recs, reused, stored = write_stage_outputs(storage, CANDIDATES_STAGE, key,
                                                       {"candidates": (PAIRS, batches)}, fresh)
            candidates = made["table"] if "table" in made else read_dataset(recs["candidates"])
            # reused candidates: the miners' figures hold, their timings are not this run's
            report = {k: v for k, v in stored.items() if not (reused and is_timing(k))}
            report["candidates_reused"] = float(reused)
        published = read_dataset(published_rec) if published_rec is not None else None
        table, selected = select_pairs(candidates, published, cfg.mine)
        return {"pairs": table}, report | selected

    records, _ = run_stage(cfg, parent_run_id, StageSpec(
        name="mine", outputs={"pairs": PAIRS}, produce=produce,
        key_inputs=mined_from | ({"published_pairs": published_rec.fingerprint if published_rec else None}
                                 if sticky else {}),
        params={"mine": cfg.mine.model_dump(mode="json"), "positive_rule": cfg.events.model_dump(mode="json"),
                **({"published_pairs": published_rec.path if published_rec else "none"} if sticky else {})},
        summary=lambda recs, rep: "mine: {:,} pairs ({}){}".format(
            recs["pairs"].rows, ", ".join(f"{k}={v:,.0f}" for k, v in rep.items() if k.endswith(".pairs")),
            "; {:,.0f} published Swing pairs kept, {:,.0f} new".format(rep["swing.kept_published"], rep["swing.new"])
            if "swing.kept_published" in rep else "")))
    return records
