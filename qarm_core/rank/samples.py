"""Time-ordered ranking samples (the ML-100K analogue of the Amazon Books protocol of DIN/SIM/QARM V2).

Protocol, deterministic for a given log, config and seed:

1. **Order.** Each user's events are ordered by ``(ts, item_id)``; ``pos`` is an event's 0-based place in
   that order. ML-100K stamps many events with the same second; the item id breaks those ties, so the
   order (and everything below) never depends on row order in the input.
2. **Labels.** Every event is a target: positive if ``rating >= min_rating`` (``events.positive_min_rating``),
   negative if rated lower. Logs without ratings use their 0/1 ``label``; an event with neither is a
   DataError.
3. **Sampled negatives.** For each positive event and each of ``negative_sets`` independent sets,
   ``neg_per_positive`` items drawn uniformly from the item index that the user had not interacted
   with by the end of the sample's period (train: before ``valid_start``; valid: before
   ``test_start``; test: anywhere in the log), so that no training or validation sample depends on a
   later period's events. A sampled negative shares the positive's user, time and history, has
   ``sampled = true`` and ``neg_set`` = its set; real events have ``neg_set = -1`` and belong to every
   set. Seed ``i`` of a comparison trains and is evaluated on set ``i mod negative_sets``, so seeds
   vary the negatives as well as the initialisation. Draws come from a splitmix64 hash of ``(seed,
   user_id, pos, set, draw)``, so they do not depend on DuckDB's hash or on threads. A user who has
   seen almost the whole catalog may get fewer negatives (24 + 4 x ratio draws are tried per event).
4. **History.** A sample's history is the user's events with a smaller ``pos`` (all ratings, as in the
   Amazon Books protocol, where any review is a behaviour), whatever their period: at serving time the
   model sees everything the user did before the request. The long history is the last ``long_len``
   of them (the GSU searches it), the short history the last ``short_len``. Histories are not
   materialised: ``sequences`` holds each user's ordered item list and a sample's ``pos`` cuts it.
   The first event of a user has an empty history; the models handle that (zero interest vector).
5. **Split by time.** ``split`` is the period of the target event's time under the pipeline's one
   split (``qarm_core.split``): models train on ``train``, choose settings on ``valid``, report
   ``test``.

Built in DuckDB (window functions, anti-join) and numpy (the hash), with no Python loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from qarm_core.arrays import count_distinct
from qarm_core.base import DuckDBConfig
from qarm_core.duck import connect
from qarm_core.errors import DataError
from qarm_core.events import POSITIVE_MIN_RATING, positive_sql
from qarm_core.rank.config import SamplesConfig
from qarm_core.rank.inputs import ItemIndex
from qarm_core.schemas import RANK_SAMPLES, RANK_SEQUENCES
from qarm_core.split import Cutoffs

STAGE = "rank"

# The ranking samples' schemas live with every other dataset's, in ``qarm_core.schemas``.
SAMPLES_SCHEMA = RANK_SAMPLES.schema
SEQUENCES_SCHEMA = RANK_SEQUENCES.schema


@dataclass(frozen=True)
class Samples:
    samples: pa.Table        # SAMPLES_SCHEMA, ordered by (split, user_id, pos, sampled, neg_set, item_id)
    sequences: pa.Table      # SEQUENCES_SCHEMA, one row per user, ordered by user_id
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
                  temp_dir: str | Path, cutoffs: Cutoffs, negative_sets: int = 1,
                  min_rating: float = POSITIVE_MIN_RATING) -> Samples:
    """Samples and per-user sequences from ``interactions`` (user_id, item_id, ts, rating and/or label),
    split by ``cutoffs`` (the pipeline's periods), with ``negative_sets`` independent negative draws.

    Every item id in the log must be in ``index`` (DataError otherwise: unknown ids are never dropped
    silently). See the module docstring for the protocol.
    """
    if negative_sets < 1:
        raise DataError(STAGE, "samples", f"negative_sets must be >= 1, got {negative_sets}")
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
            CREATE TEMP TABLE kept AS
            SELECT user_id, item_id, ts,
                   {positive_sql(rating, label, min_rating)} AS label,
                   (row_number() OVER (PARTITION BY user_id ORDER BY ts, item_id) - 1)::INTEGER AS pos,
                   {cutoffs.sql("ts")} AS split,
                   (ts >= {cutoffs.valid_start})::INTEGER + (ts >= {cutoffs.test_start})::INTEGER AS period
            FROM inter""")
        unlabelled = con.sql("SELECT count(*) FROM kept WHERE label IS NULL").fetchall()[0][0]
        if unlabelled:
            raise DataError(STAGE, "interactions", f"{unlabelled} event(s) have neither a rating nor a label")
        pos_events = con.sql("SELECT user_id, pos, period FROM kept WHERE label = 1 ORDER BY user_id, pos"
                             ).to_arrow_table()

        # Sampled negatives: candidate draws hashed in numpy, filtered in SQL against the items the
        # user had touched by the end of the sample's period (the first period of each (user, item)).
        r = cfg.neg_per_positive
        if r > 0 and pos_events.num_rows:
            draws = 24 + 4 * r
            u = pos_events["user_id"].to_numpy()
            p = pos_events["pos"].to_numpy()
            d = np.arange(draws, dtype=np.int64)
            parts = []
            for k in range(negative_sets):
                h = _mix(np.int64(cfg.seed), u[:, None], p[:, None], np.int64(k), d[None, :])
                cand = index.item_ids[(h % np.uint64(index.n)).astype(np.int64)]
                parts.append(pa.table({"user_id": np.repeat(u, draws), "pos": np.repeat(p, draws).astype(np.int32),
                                       "neg_set": np.full(len(u) * draws, k, np.int16),
                                       "draw": np.tile(d, len(u)), "item_id": cand.reshape(-1)}))
            con.register("cands", pa.concat_tables(parts))
            con.execute(f"""
                CREATE TEMP TABLE negs AS
                WITH seen AS (SELECT user_id, item_id, min(period) AS first_period FROM kept GROUP BY ALL),
                fresh AS (
                    SELECT c.user_id, c.pos, c.neg_set, c.item_id, min(c.draw) AS draw
                    FROM cands c JOIN kept k ON k.user_id = c.user_id AND k.pos = c.pos
                    LEFT JOIN seen s ON s.user_id = c.user_id AND s.item_id = c.item_id
                    WHERE s.first_period IS NULL OR s.first_period > k.period
                    GROUP BY ALL),
                ranked AS (
                    SELECT *, row_number() OVER (PARTITION BY user_id, pos, neg_set ORDER BY draw) AS rk FROM fresh)
                SELECT r.user_id, r.item_id, k.ts, 0::TINYINT AS label, r.pos, k.split, r.neg_set
                FROM ranked r JOIN kept k ON k.user_id = r.user_id AND k.pos = r.pos
                WHERE r.rk <= {r}""")
        else:
            con.execute("CREATE TEMP TABLE negs AS SELECT user_id, item_id, ts, label, pos, split, "
                        "0::SMALLINT AS neg_set FROM kept LIMIT 0")
        samples = con.sql("""
            SELECT user_id::BIGINT AS user_id, item_id::BIGINT AS item_id, label::TINYINT AS label,
                   pos::INTEGER AS pos, ts::BIGINT AS ts, split, sampled, neg_set::SMALLINT AS neg_set
            FROM (SELECT user_id, item_id, ts, label, pos, split, false AS sampled, -1 AS neg_set FROM kept
                  UNION ALL SELECT user_id, item_id, ts, label, pos, split, true AS sampled, neg_set FROM negs)
            ORDER BY CASE split WHEN 'train' THEN 0 WHEN 'valid' THEN 1 ELSE 2 END, user_id, pos, sampled,
                     neg_set, item_id""").to_arrow_table()
        sequences = con.sql("""
            SELECT user_id::BIGINT AS user_id, list(item_id::BIGINT ORDER BY pos) AS items
            FROM kept GROUP BY user_id ORDER BY user_id""").to_arrow_table()
    finally:
        con.close()
    samples = samples.cast(SAMPLES_SCHEMA)
    sequences = sequences.cast(SEQUENCES_SCHEMA)
    report = summarize(samples)
    report["users"] = sequences.num_rows
    report["negative_sets"] = negative_sets
    return Samples(samples, sequences, report)


SPLITS = ("train", "valid", "test")


def summarize(samples: pa.Table) -> dict:
    """Counts per split: samples (of negative set 0), positives, sampled negatives, empty histories, users."""
    split = samples["split"].to_numpy(zero_copy_only=False)
    label = samples["label"].to_numpy()
    sampled = samples["sampled"].to_numpy(zero_copy_only=False)
    pos = samples["pos"].to_numpy()
    in_set0 = samples["neg_set"].to_numpy() <= 0
    users = samples["user_id"].to_numpy()
    out: dict = {}
    for s in SPLITS:
        m = (split == s) & in_set0
        out[f"{s}.samples"] = int(m.sum())
        out[f"{s}.positives"] = int((label[m] == 1).sum())
        out[f"{s}.sampled_negatives"] = int(sampled[m].sum())
        out[f"{s}.empty_history"] = int((pos[m] == 0).sum())
        out[f"{s}.users"] = count_distinct(users[m])
    return out


def period_violations(samples: pa.Table, cutoffs: Cutoffs) -> int:
    """Samples whose ``split`` is not the period of their time under ``cutoffs`` (0 when the samples
    were cut with these cutoffs; anything else means they belong to another split)."""
    want = np.array(SPLITS, dtype=object)[cutoffs.period_of(samples["ts"].to_numpy())]
    return int((want != samples["split"].to_numpy(zero_copy_only=False)).sum())


def users_with_both_labels(samples: pa.Table, split: str) -> int:
    """Users of ``split`` with a positive and a negative sample (those GAUC can score)."""
    import pyarrow.compute as pc

    part = samples.filter(pc.equal(samples["split"], split))
    per_user = part.group_by("user_id").aggregate([("label", "min"), ("label", "max")])
    return int(pc.sum(pc.not_equal(per_user["label_min"], per_user["label_max"])).as_py() or 0)


def check_samples(samples: Samples, cutoffs: Cutoffs, min_train_samples: int = 1, min_test_users: int = 1,
                  missing_code_share: float | None = None, max_missing_code_share: float = 1.0):
    """The samples gate (dataset ``rank_samples``): enough training samples, both labels in each
    split, every sample in the period of its time under the pipeline's ``cutoffs``, enough
    validation and test users with both labels (GAUC), and few items without codes. Returns a
    ``qarm_core.gates.GateResult``; ``raise_if_failed()`` turns it into a GateError."""
    from qarm_core.gates import Check, GateResult

    s = samples.samples
    rep = samples.report
    checks = [Check("expect_train_samples_to_be_at_least", {"min": min_train_samples},
                    rep["train.samples"] >= min_train_samples, int(rep["train.samples"] < min_train_samples),
                    observed=rep["train.samples"], engine="qarm")]
    for split in SPLITS:
        n, p = rep[f"{split}.samples"], rep[f"{split}.positives"]
        ok = 0 < p < n
        checks.append(Check("expect_both_labels", {"split": split}, ok, int(not ok),
                            observed={"samples": n, "positives": p}, engine="qarm"))
    bad = period_violations(s, cutoffs)
    checks.append(Check("expect_samples_in_their_period", {"valid_start": cutoffs.valid_start,
                                                           "test_start": cutoffs.test_start},
                        bad == 0, bad, observed=bad, engine="qarm"))
    for split in ("valid", "test"):
        both = users_with_both_labels(s, split)
        checks.append(Check(f"expect_{split}_users_with_both_labels_to_be_at_least", {"min": min_test_users},
                            both >= min_test_users, int(both < min_test_users), observed=both, engine="qarm"))
    if missing_code_share is not None:
        ok = missing_code_share <= max_missing_code_share
        checks.append(Check("expect_share_of_items_without_codes_to_be_at_most", {"max": max_missing_code_share},
                            ok, int(not ok), observed=missing_code_share, engine="qarm"))
    return GateResult(STAGE, "rank_samples", s.num_rows, checks)
