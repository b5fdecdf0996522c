"""Time-ordered ranking samples (the ML-100K analogue of the Amazon Books protocol of DIN/SIM/QARM V2).

Protocol, deterministic for a given log, config and seed:

1. **Order.** Each user's events are ordered by ``(ts, item_id)``; ``pos`` is an event's 0-based place in
   that order. ML-100K stamps many events with the same second; the item id breaks those ties, so the
   order (and everything below) never depends on row order in the input.
2. **Labels.** Every event is a target: positive if ``rating >= positive_min_rating`` (4 on a 1-5 scale),
   negative if rated lower. Logs without ratings use their 0/1 ``label``; an event with neither is a
   DataError.
3. **Sampled negatives.** For each positive event, ``neg_per_positive`` items drawn uniformly from the
   item index that the user *never* interacted with (anywhere in the log); a sampled negative shares the
   positive's user, time and history and has ``sampled = true``. Draws come from a splitmix64 hash of
   ``(seed, user_id, pos, draw)``, so they do not depend on DuckDB's hash or on threads. A user who has
   seen almost the whole catalog may get fewer negatives (24 + 4 x ratio draws are tried per event).
4. **History.** A sample's history is the user's events with a smaller ``pos`` (all ratings, as in the
   Amazon Books protocol, where any review is a behaviour). The long history is the last ``long_len``
   of them (the GSU searches it), the short history the last ``short_len``. Histories are not
   materialised: ``sequences`` holds each user's ordered item list and a sample's ``pos`` cuts it.
   The first event of a user has an empty history; the models handle that (zero interest vector).
5. **Split by time.** Each user's last ``test_events`` events (and their sampled negatives) are the
   test set, the earlier ones the training set; a user with fewer than ``test_events +
   min_train_events`` events is left out (counted in the report).

Built in DuckDB (window functions, anti-join) and numpy (the hash), with no Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from qarm_core.base import DuckDBConfig
from qarm_core.duck import connect
from qarm_core.errors import DataError
from qarm_core.events import positive_sql
from qarm_core.rank.config import SamplesConfig
from qarm_core.rank.inputs import ItemIndex
from qarm_core.schemas import RANK_SAMPLES, RANK_SEQUENCES

STAGE = "rank"

# The ranking samples' schemas live with every other dataset's, in ``qarm_core.schemas``.
SAMPLES_SCHEMA = RANK_SAMPLES.schema
SEQUENCES_SCHEMA = RANK_SEQUENCES.schema


@dataclass(frozen=True)
class Samples:
    samples: pa.Table        # SAMPLES_SCHEMA, ordered by (split, user_id, pos, sampled, item_id)
    sequences: pa.Table      # SEQUENCES_SCHEMA, one row per kept user, ordered by user_id
    report: dict


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 ``(...)`` (wrapping arithmetic): a fixed, portable hash."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _mix(*cols: np.ndarray) -> np.ndarray:
    h = np.zeros(np.broadcast(*cols).shape, np.uint64)
    for c in cols:
        h = splitmix64(h ^ np.asarray(c).astype(np.int64).view(np.uint64))
    return h


def check_interactions(interactions: pa.Table, dataset: str = "interactions") -> None:
    need = {"user_id", "item_id", "ts"}
    missing = need - set(interactions.column_names)
    if missing:
        raise DataError(STAGE, dataset, f"missing column(s) {sorted(missing)}; found {interactions.column_names}")
    if not {"rating", "label"} & set(interactions.column_names):
        raise DataError(STAGE, dataset, "needs a 'rating' or a 'label' column to derive labels")
    if interactions.num_rows == 0:
        raise DataError(STAGE, dataset, "no interactions")
    for c in need:
        if interactions[c].null_count:
            raise DataError(STAGE, dataset, f"{interactions[c].null_count} null(s) in {c!r}")


def build_samples(interactions: pa.Table, index: ItemIndex, cfg: SamplesConfig, duck: DuckDBConfig,
                  temp_dir: str | Path) -> Samples:
    """Samples and per-user sequences from ``interactions`` (user_id, item_id, ts, rating and/or label).

    Every item id in the log must be in ``index`` (DataError otherwise: unknown ids are never dropped
    silently). See the module docstring for the protocol.
    """
    check_interactions(interactions)
    index.lookup(interactions["item_id"].to_numpy(), "interactions")   # unknown ids -> DataError
    cols = [c for c in ("user_id", "item_id", "ts", "rating", "label") if c in interactions.column_names]
    inter = interactions.select(cols)
    rating = "rating" if "rating" in cols else "NULL::FLOAT"
    label = "label" if "label" in cols else "NULL::TINYINT"
    con = connect(duck, temp_dir)
    try:
        con.register("inter", inter)
        con.execute(f"""
            CREATE TEMP TABLE ev AS
            SELECT user_id, item_id, ts,
                   {positive_sql(rating, label, cfg.positive_min_rating)} AS label,
                   (row_number() OVER (PARTITION BY user_id ORDER BY ts, item_id) - 1)::INTEGER AS pos,
                   count(*) OVER (PARTITION BY user_id) AS n_user
            FROM inter""")
        unlabelled = con.sql("SELECT count(*) FROM ev WHERE label IS NULL").fetchall()[0][0]
        if unlabelled:
            raise DataError(STAGE, "interactions", f"{unlabelled} event(s) have neither a rating nor a label")
        min_events = cfg.test_events + cfg.min_train_events
        con.execute(f"""
            CREATE TEMP TABLE kept AS
            SELECT user_id, item_id, ts, label, pos,
                   CASE WHEN pos >= n_user - {cfg.test_events} THEN 'test' ELSE 'train' END AS split
            FROM ev WHERE n_user >= {min_events}""")
        dropped_users = con.sql(f"SELECT count(DISTINCT user_id) FROM ev WHERE n_user < {min_events}").fetchall()[0][0]
        pos_events = con.sql("SELECT user_id, pos FROM kept WHERE label = 1 ORDER BY user_id, pos").to_arrow_table()

        # Sampled negatives: candidate draws hashed in numpy, filtered against the user's items in SQL.
        r = cfg.neg_per_positive
        if r > 0 and pos_events.num_rows:
            draws = 24 + 4 * r
            u = pos_events["user_id"].to_numpy()
            p = pos_events["pos"].to_numpy()
            d = np.arange(draws, dtype=np.int64)
            h = _mix(np.int64(cfg.seed), u[:, None], p[:, None], d[None, :])
            cand = index.item_ids[(h % np.uint64(index.n)).astype(np.int64)]
            cands = pa.table({"user_id": np.repeat(u, draws), "pos": np.repeat(p, draws).astype(np.int32),
                              "draw": np.tile(d, len(u)), "item_id": cand.reshape(-1)})
            con.register("cands", cands)
            con.execute(f"""
                CREATE TEMP TABLE negs AS
                WITH fresh AS (
                    SELECT c.user_id, c.pos, c.item_id, min(c.draw) AS draw
                    FROM cands c ANTI JOIN (SELECT DISTINCT user_id, item_id FROM ev) s
                      ON c.user_id = s.user_id AND c.item_id = s.item_id
                    GROUP BY ALL),
                ranked AS (
                    SELECT *, row_number() OVER (PARTITION BY user_id, pos ORDER BY draw) AS k FROM fresh)
                SELECT r.user_id, r.item_id, k.ts, 0::TINYINT AS label, r.pos, k.split
                FROM ranked r JOIN kept k ON k.user_id = r.user_id AND k.pos = r.pos
                WHERE r.k <= {r}""")
        else:
            con.execute("CREATE TEMP TABLE negs AS SELECT user_id, item_id, ts, label, pos, split FROM kept LIMIT 0")
        samples = con.sql("""
            SELECT user_id::BIGINT AS user_id, item_id::BIGINT AS item_id, label::TINYINT AS label,
                   pos::INTEGER AS pos, ts::BIGINT AS ts, split, sampled
            FROM (SELECT *, false AS sampled FROM kept UNION ALL SELECT *, true AS sampled FROM negs)
            ORDER BY split DESC, user_id, pos, sampled, item_id""").to_arrow_table()
        sequences = con.sql("""
            SELECT user_id::BIGINT AS user_id, list(item_id::BIGINT ORDER BY pos) AS items
            FROM kept GROUP BY user_id ORDER BY user_id""").to_arrow_table()
    finally:
        con.close()
    samples = samples.cast(SAMPLES_SCHEMA)
    sequences = sequences.cast(SEQUENCES_SCHEMA)
    report = summarize(samples)
    report["users.dropped_short"] = int(dropped_users)
    report["users"] = sequences.num_rows
    return Samples(samples, sequences, report)


def summarize(samples: pa.Table) -> dict:
    """Counts per split: samples, positives, sampled negatives, empty histories."""
    split = samples["split"].to_numpy(zero_copy_only=False)
    label = samples["label"].to_numpy()
    sampled = samples["sampled"].to_numpy(zero_copy_only=False)
    pos = samples["pos"].to_numpy()
    out: dict = {}
    for s in ("train", "test"):
        m = split == s
        out[f"{s}.samples"] = int(m.sum())
        out[f"{s}.positives"] = int((label[m] == 1).sum())
        out[f"{s}.sampled_negatives"] = int(sampled[m].sum())
        out[f"{s}.empty_history"] = int((pos[m] == 0).sum())
    return out


def time_split_violations(samples: pa.Table) -> int:
    """Users whose earliest test event comes before their latest training event, by time or by
    position (0 when the split is by time; equal seconds are fine, the order being (ts, item_id))."""
    import pyarrow.compute as pc

    def agg(split: str, fn: str) -> pa.Table:
        part = samples.filter(pc.equal(samples["split"], split))
        return part.group_by("user_id").aggregate([("ts", fn), ("pos", fn)])

    j = agg("train", "max").join(agg("test", "min"), "user_id", join_type="inner")
    bad = pc.or_(pc.less(j["ts_min"], j["ts_max"]), pc.less_equal(j["pos_min"], j["pos_max"]))
    return int(pc.sum(pc.cast(bad, pa.int64())).as_py() or 0)


def check_samples(samples: Samples, min_train_samples: int = 1, min_test_users: int = 1,
                  missing_code_share: float | None = None, max_missing_code_share: float = 1.0):
    """The samples gate (dataset ``rank_samples``): enough training samples, both labels in each
    split, a time-ordered split, enough test users with both labels (GAUC), and few items without
    codes. Returns a ``qarm_core.gates.GateResult``; ``raise_if_failed()`` turns it into a GateError."""
    import pyarrow.compute as pc

    from qarm_core.gates import Check, GateResult

    s = samples.samples
    rep = samples.report
    checks = [Check("expect_train_samples_to_be_at_least", {"min": min_train_samples},
                    rep["train.samples"] >= min_train_samples, int(rep["train.samples"] < min_train_samples),
                    observed=rep["train.samples"], engine="qarm")]
    for split in ("train", "test"):
        n, p = rep[f"{split}.samples"], rep[f"{split}.positives"]
        ok = 0 < p < n
        checks.append(Check("expect_both_labels", {"split": split}, ok, int(not ok),
                            observed={"samples": n, "positives": p}, engine="qarm"))
    bad = time_split_violations(s)
    checks.append(Check("expect_test_after_train_per_user", {}, bad == 0, bad, observed=bad, engine="qarm"))
    test = s.filter(pc.equal(s["split"], "test"))
    per_user = test.group_by("user_id").aggregate([("label", "min"), ("label", "max")])
    both = int(pc.sum(pc.not_equal(per_user["label_min"], per_user["label_max"])).as_py() or 0)
    checks.append(Check("expect_test_users_with_both_labels_to_be_at_least", {"min": min_test_users},
                        both >= min_test_users, int(both < min_test_users), observed=both, engine="qarm"))
    if missing_code_share is not None:
        ok = missing_code_share <= max_missing_code_share
        checks.append(Check("expect_share_of_items_without_codes_to_be_at_most", {"max": max_missing_code_share},
                            ok, int(not ok), observed=missing_code_share, engine="qarm"))
    return GateResult(STAGE, "rank_samples", s.num_rows, checks)
