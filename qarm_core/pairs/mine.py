"""Stage 1 entry point: run the configured miners over the interaction log."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import pyarrow as pa

from qarm_core.config import MineConfig
from qarm_core.duck import parquet_source
from qarm_core.errors import DataError
from qarm_core.schemas import PAIRS
from qarm_core.storage import DatasetRecord

STAGE = "mine"


def positive_filter_sql(min_rating: float | None) -> str:
    """SQL predicate for the events that count: rating >= min_rating where a rating is given,
    else label = 1; every event when ``min_rating`` is None."""
    if min_rating is None:
        return "TRUE"
    return f"CASE WHEN rating IS NOT NULL THEN rating >= {float(min_rating)!r} ELSE label = 1 END"


def load_events(con: duckdb.DuckDBPyConnection, interactions: DatasetRecord,
                min_rating: float | None, columns: tuple[str, ...] = ("user_id", "item_id", "ts")) -> pa.Table:
    """The counting events of the interactions dataset, ``(n_events,)`` columns, ordered by ts."""
    files = [str(Path(interactions.path) / f) for f in interactions.files]
    return con.sql(f"SELECT {', '.join(columns)} FROM {parquet_source(files)} "
                   f"WHERE {positive_filter_sql(min_rating)} ORDER BY ts, user_id, item_id").to_arrow_table()


def mine_pairs(events: pa.Table, cfg: MineConfig) -> tuple[pa.Table, dict[str, float]]:
    """All configured miners' pairs in one PAIRS table, plus a report of counts and timings."""
    if events.num_rows == 0:
        raise DataError(STAGE, "interactions", "no events left to mine pairs from "
                                               f"(min_rating={cfg.min_rating})")
    from qarm_core.pairs.swing import mine_swing_pairs

    tables: list[pa.Table] = []
    report: dict[str, float] = {"events": float(events.num_rows)}
    for source in cfg.sources:
        t0 = time.perf_counter()
        if source == "swing":
            table = mine_swing_pairs(events["user_id"].to_numpy(), events["item_id"].to_numpy(),
                                     cfg.swing.params())
        else:
            raise DataError(STAGE, "pairs", f"miner {source!r} is not available in this build")
        report[f"{source}.seconds"] = time.perf_counter() - t0
        report[f"{source}.pairs"] = float(table.num_rows)
        report[f"{source}.src_items"] = float(len(set(table["src_item"].to_numpy()))) if table.num_rows else 0.0
        tables.append(table)
    return pa.concat_tables(tables).cast(PAIRS.schema), report
