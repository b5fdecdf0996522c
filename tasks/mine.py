"""Mine task: Swing (and two-tower) pairs from the training period's events."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from prefect import task

from qarm_core.config import PipelineConfig
from qarm_core.duck import connect
from qarm_core.pairs.mine import load_interactions, mine_candidates, select_pairs
from qarm_core.pairs.two_tower import TOWERS_FORMAT, load_towers, save_towers
from qarm_core.schemas import PAIRS
from qarm_core.storage import CURRENT_AT_READ, DatasetRecord, Storage, read_dataset, write_stage_outputs
from tasks.common import BATCH_ROWS, TASK_DEFAULTS, StageSpec, is_timing, link_tree, run_stage, stage_key

# The candidates' cache folder (work/<this>/<key>): mined once per input, selected against each
# published snapshot (swing.keep_published_depth).
CANDIDATES_STAGE = "mine-candidates"
TOWERS = "two_tower"        # the u2i miner's towers: an output of the stage, published with the pairs


def _write_towers(folder: Path, made: Mapping[str, Any]) -> None:
    """The towers the miner used: the model trained in this run, or the folder of towers it reused
    (published or cached), linked."""
    towers = made[TOWERS]
    if isinstance(towers, Path):
        link_tree(towers, folder)
    else:
        save_towers(towers, folder)


@task(name="mine-pairs", **TASK_DEFAULTS)
def mine(cfg: PipelineConfig, parent_run_id: str, events: DatasetRecord,
         items: DatasetRecord, parent: str | None = CURRENT_AT_READ) -> dict[str, DatasetRecord]:
    """Stage ``pairs`` (src_item, dst_item, score, source) from ``events`` (the split's
    ``train_events``), and with the u2i miner ``two_tower``, its towers; reused when inputs and config
    match. With ``mine.swing.keep_published_depth``
    the published snapshot's pairs are an input too: the mined candidates (depth x top_k per item)
    are kept apart (reused when only the published pairs changed) and each item keeps its published
    neighbours that are still among them (those of ``parent``, the snapshot the refresh started from).
    With ``mine.u2i.reuse_model`` (the daily schedule) the u2i miner uses the published towers
    instead of training, when there are any and they were trained under the same settings."""
    storage = Storage(cfg.home).as_of(parent)
    u2i = "u2i" in cfg.mine.sources
    towers_rec = storage.published_cache(TOWERS) if u2i and cfg.mine.u2i.reuse_model else None
    if towers_rec is not None and towers_rec.schema_version != TOWERS_FORMAT:
        towers_rec = None           # written by another qarm: the towers train, as with none published
    mined_from = {"events": events.fingerprint, "items": items.fingerprint,
                  "positive_rule": cfg.events.model_dump(mode="json"), "mine": cfg.mine.model_dump(mode="json"),
                  **({"towers": towers_rec.fingerprint} if towers_rec is not None else {})}
    sticky = cfg.mine.swing.keep_published_depth is not None and "swing" in cfg.mine.sources
    # only the record here (its fingerprint is in the key); the table is read if the stage runs
    published_rec = storage.published_cache("pairs") if sticky else None
    artifacts = {TOWERS: (TOWERS_FORMAT, _write_towers)} if u2i else {}

    def mined():
        con = connect(cfg.duckdb, storage.duckdb_temp_dir)
        try:
            log = load_interactions(con, events)
        finally:
            con.close()
        catalog = read_dataset(items) if u2i else None
        saved = load_towers(towers_rec.path) if towers_rec is not None else None
        table, report, model = mine_candidates(log, catalog, cfg.mine, cfg.events.positive_min_rating, saved)
        # Reused towers are published as they are (linked): saving the model would write today's id
        # table, with every new item's mean row baked in, ~0.5 GB a day at 1M items, and the next
        # day could no longer tell the items the towers were trained on from those they never saw.
        return table, report, (Path(towers_rec.path) if report.get("u2i.reused") else model)

    def produce():
        if not sticky:
            candidates, report, towers = mined()
        else:
            made: dict = {}
            fresh: dict = {}

            def batches():
                made["table"], rep, made[TOWERS] = mined()
                fresh.update(rep)
                return iter(made["table"].to_batches(max_chunksize=BATCH_ROWS))

            spec = StageSpec(name=CANDIDATES_STAGE, key_inputs=mined_from, outputs={"candidates": PAIRS},
                             produce=mined, artifacts=artifacts)
            recs, reused, stored = write_stage_outputs(
                storage, CANDIDATES_STAGE, stage_key(spec), {"candidates": (PAIRS, batches)}, fresh,
                artifacts={n: (v, lambda folder, w=w: w(folder, made)) for n, (v, w) in artifacts.items()})
            candidates = made["table"] if "table" in made else read_dataset(recs["candidates"])
            # the candidates' copy of the towers (just written, or cached): linked, not written again
            towers = Path(recs[TOWERS].path) if u2i else None
            # reused candidates: the miners' figures hold, their timings are not this run's
            report = {k: v for k, v in stored.items() if not (reused and is_timing(k))}
            report["candidates_reused"] = float(reused)
        published = read_dataset(published_rec) if published_rec is not None else None
        table, selected = select_pairs(candidates, published, cfg.mine)
        return {"pairs": table, **({TOWERS: towers} if u2i else {})}, report | selected

    records, _ = run_stage(cfg, parent_run_id, StageSpec(
        name="mine", outputs={"pairs": PAIRS}, produce=produce, artifacts=artifacts,
        key_inputs=mined_from | ({"published_pairs": published_rec.fingerprint if published_rec else None}
                                 if sticky else {}),
        params={"mine": cfg.mine.model_dump(mode="json"), "positive_rule": cfg.events.model_dump(mode="json"),
                **({"published_pairs": published_rec.path if published_rec else "none"} if sticky else {}),
                **({"published_towers": towers_rec.path if towers_rec else "none"} if u2i else {})},
        summary=lambda recs, rep: "mine: {:,} pairs ({}){}{}".format(
            recs["pairs"].rows, ", ".join(f"{k}={v:,.0f}" for k, v in rep.items() if k.endswith(".pairs")),
            "; {:,.0f} published Swing pairs kept, {:,.0f} new".format(rep["swing.kept_published"], rep["swing.new"])
            if "swing.kept_published" in rep else "",
            "; the published two-tower model reused ({:,.0f} items it never saw)".format(rep["u2i.items_unseen"])
            if rep.get("u2i.reused") else "")))
    return records
