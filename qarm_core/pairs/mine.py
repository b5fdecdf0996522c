"""Stage 1 entry point: run the configured miners over the interaction log."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from qarm_core.pairs.config import MineConfig
from qarm_core.duck import parquet_source
from qarm_core.errors import DataError
from qarm_core.events import POSITIVE_MIN_RATING, positive_mask
from qarm_core.schemas import PAIRS
from qarm_core.storage import DatasetRecord

if TYPE_CHECKING:
    from qarm_core.pairs.two_tower import SavedTowers, TwoTowerModel

STAGE = "mine"
log = logging.getLogger(__name__)


def load_interactions(con: duckdb.DuckDBPyConnection, interactions: DatasetRecord) -> pa.Table:
    """The whole interactions dataset ``(n_events,)`` ordered by (ts, user_id, item_id)."""
    files = [str(Path(interactions.path) / f) for f in interactions.files]
    return con.sql(f"SELECT user_id, item_id, ts, rating, label FROM {parquet_source(files)} "
                   "ORDER BY ts, user_id, item_id").to_arrow_table()


def mine_pairs(interactions: pa.Table, items: pa.Table | None, cfg: MineConfig,
               min_rating: float | None = POSITIVE_MIN_RATING, published: pa.Table | None = None
               ) -> tuple[pa.Table, dict[str, float]]:
    """``mine_candidates`` then ``select_pairs``: the pairs of one refresh and their report."""
    candidates, report, _ = mine_candidates(interactions, items, cfg, min_rating)
    table, selected = select_pairs(candidates, published, cfg)
    return table, report | selected


def mine_candidates(interactions: pa.Table, items: pa.Table | None, cfg: MineConfig,
                    min_rating: float | None = POSITIVE_MIN_RATING, towers: "SavedTowers | None" = None
                    ) -> tuple[pa.Table, dict[str, float], "TwoTowerModel | None"]:
    """All configured miners' pairs in one PAIRS table, a report of counts, timings and the
    two-tower's recall@k against popularity, and the two-tower model (None without the u2i miner).
    Both miners learn from the positive events (``qarm_core.events``: rating >= ``min_rating``, else
    label 1; None: every event). Swing keeps ``swing.candidates_k`` neighbours per item, of which
    ``select_pairs`` keeps ``top_k``. ``towers``: published towers the u2i miner uses instead of
    training when their settings allow (``two_tower.mine_u2i_pairs``)."""
    from qarm_core.pairs.swing import mine_swing_pairs

    if interactions.num_rows == 0:
        raise DataError(STAGE, "interactions", "no interactions to mine pairs from")
    model = None
    tables: list[pa.Table] = []
    report: dict[str, float] = {"events": float(interactions.num_rows)}
    for source in cfg.sources:
        t0 = time.perf_counter()
        log.info("mine: %s over %s events", "Swing item-to-item pairs" if source == "swing"
                 else "two-tower user-to-item pairs", f"{interactions.num_rows:,}")
        if source == "swing":
            keep = positive_mask(interactions, min_rating, STAGE)
            if not keep.any():
                raise DataError(STAGE, "interactions", f"no events pass min_rating={min_rating}")
            table = mine_swing_pairs(interactions["user_id"].to_numpy()[keep],
                                     interactions["item_id"].to_numpy()[keep], cfg.swing, k=cfg.swing.candidates_k)
            report["swing.events"] = float(keep.sum())
        else:
            from qarm_core.pairs.two_tower import mine_u2i_pairs

            if items is None:
                raise DataError(STAGE, "items", "the u2i miner needs the items dataset")
            table, rep, model = mine_u2i_pairs(interactions, items, cfg.u2i, k=cfg.u2i.recall_k,
                                               min_rating=min_rating, published=towers)
            report |= {f"u2i.{k}": float(v) for k, v in rep.items() if isinstance(v, (int, float))}
        report[f"{source}.seconds"] = time.perf_counter() - t0
        report[f"{source}.pairs"] = float(table.num_rows)
        log.info("mine: %s pairs from %s in %.1f s", f"{table.num_rows:,}", source, report[f"{source}.seconds"])
        tables.append(table)
    return pa.concat_tables(tables).cast(PAIRS.schema), report, model


def select_pairs(candidates: pa.Table, published: pa.Table | None, cfg: MineConfig
                 ) -> tuple[pa.Table, dict[str, float]]:
    """The refresh's pairs from ``mine_candidates``' table: each item's Swing ``top_k``, keeping the
    pairs of ``published`` (the published snapshot's pairs, or None) that are among its
    ``swing.candidates_k`` (``swing.keep_published_neighbours``); other sources as mined. Report:
    ``swing.pairs``, ``swing.candidates`` and, with ``published`` and ``keep_published_depth``,
    ``swing.kept_published`` / ``swing.new`` / ``swing.new_if_fresh`` / ``swing.published``."""
    from qarm_core.pairs.swing import PAIRS_SOURCE, keep_published_neighbours

    if "swing" not in cfg.sources:
        return candidates, {}
    is_swing = pc.equal(candidates["source"], PAIRS_SOURCE)
    previous = None
    if published is not None and cfg.swing.keep_published_depth is not None:
        previous = published.filter(pc.equal(published["source"], PAIRS_SOURCE)).select(["src_item", "dst_item"])
    mined = candidates.filter(is_swing)
    swing, rep = keep_published_neighbours(mined, previous, cfg.swing.top_k)
    report = {"swing.pairs": float(swing.num_rows), "swing.candidates": float(mined.num_rows)}
    if previous is not None:
        report |= {f"swing.{k}": v for k, v in rep.items()}
    others = candidates.filter(pc.invert(is_swing))
    # the miners' order: sources as configured, each sorted as its miner sorts it
    parts = [swing if s == "swing" else others.filter(pc.equal(others["source"], s)) for s in cfg.sources]
    return pa.concat_tables(parts).cast(PAIRS.schema), report
