"""The one time split every stage uses: train, validation and test periods of the interaction log.

Protocol (``SplitConfig``): two global time cutoffs, ``valid_start <= test_start`` (unix seconds).
An event belongs to

* **train** when ``ts < valid_start``: what mining, judging, QA, embedding training, SID fitting and
  the ranking models learn from;
* **valid** when ``valid_start <= ts < test_start``: what chooses settings (ranking learning rate and
  epoch, gate thresholds);
* **test** when ``ts >= test_start``: only reported, by the ranking evaluation.

By default the cutoffs are global quantiles of event time: the last ``test_fraction`` of the log's
events are test, the ``valid_fraction`` before them validation (events sharing the cutoff second all
fall on the later side). Fixed cutoffs (``valid_start``/``test_start``) replace the quantiles, e.g.
to keep a published evaluation period while the log grows.

Why global cutoffs and not "each user's last N events": a refresh at time T can only have seen the
events before T. With per-user cutoffs, one user's test events come before other users' training
events, so co-occurrence mined for training (Swing, the two-tower) would already contain the trends
of the period being tested. Global cutoffs cost something on ML-100K (users who rated everything in
one session fall entirely into one period), which the samples report counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from qarm_core.arrays import count_distinct
from qarm_core.base import Strict
from qarm_core.errors import DataError

STAGE = "split"
PERIODS = ("train", "valid", "test")


class SplitConfig(Strict):
    """Where the train / validation / test periods start (see the module doc)."""

    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0)   # share of the log's events in the validation period
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)    # 0: no test period (a production refresh)
    valid_start: int | None = None                       # fixed cutoffs (unix seconds) instead of quantiles
    test_start: int | None = None

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError("split.valid_fraction + split.test_fraction must leave a training period (< 1)")
        if (self.valid_start is None) != (self.test_start is None):
            raise ValueError("split.valid_start and split.test_start are set together (fixed cutoffs) or not at all")
        if self.valid_start is not None and self.valid_start > self.test_start:
            raise ValueError("split.valid_start must not be after split.test_start")
        return self


@dataclass(frozen=True)
class Cutoffs:
    """Resolved period boundaries (unix seconds): train < valid_start <= valid < test_start <= test."""

    valid_start: int
    test_start: int
    source: str = "quantile"        # 'quantile' | 'fixed'

    def period_of(self, ts: np.ndarray) -> np.ndarray:
        """``(n,)`` int8 period index of each timestamp: 0 train, 1 valid, 2 test."""
        ts = np.asarray(ts, np.int64)
        return ((ts >= self.valid_start).astype(np.int8) + (ts >= self.test_start).astype(np.int8)).astype(np.int8)

    def end_of(self, period: str) -> int | None:
        """The first second after ``period`` (None for test: it runs to the end of the log)."""
        return {"train": self.valid_start, "valid": self.test_start, "test": None}[period]

    def sql(self, ts: str = "ts") -> str:
        """DuckDB expression naming the period of column ``ts``."""
        return (f"CASE WHEN {ts} < {self.valid_start} THEN 'train' "
                f"WHEN {ts} < {self.test_start} THEN 'valid' ELSE 'test' END")


def resolve_cutoffs(ts: np.ndarray, cfg: SplitConfig, dataset: str = "interactions") -> Cutoffs:
    """The cutoffs of ``cfg`` for a log with event times ``ts`` ``(n_events,)``.

    Quantile cutoffs are values of ``ts``: the ``(1 - test_fraction)`` and ``(1 - test_fraction -
    valid_fraction)`` order statistics. Raises DataError when the log is empty or a period that
    must hold events (train, valid) would be empty.
    """
    ts = np.asarray(ts, np.int64)
    if len(ts) == 0:
        raise DataError(STAGE, dataset, "no events to split")
    if cfg.valid_start is not None:
        cut = Cutoffs(int(cfg.valid_start), int(cfg.test_start), "fixed")
    else:
        s = np.sort(ts)
        n = len(s)

        def start_of_last(fraction: float) -> int:
            k = int(round(n * fraction))          # events that should fall at or after the cutoff
            return int(s[-1]) + 1 if k <= 0 else int(s[max(n - k, 0)])

        cut = Cutoffs(start_of_last(cfg.test_fraction + cfg.valid_fraction), start_of_last(cfg.test_fraction))
    counts = np.bincount(cut.period_of(ts), minlength=3)
    for i, name in enumerate(PERIODS[:2]):
        if counts[i] == 0:
            raise DataError(STAGE, dataset, f"the {name} period is empty (cutoffs valid_start={cut.valid_start}, "
                                            f"test_start={cut.test_start}, {cut.source}; events from {int(ts.min())} "
                                            f"to {int(ts.max())}): widen it in the split config")
    return cut


def describe_periods(ts: np.ndarray, user_id: np.ndarray, item_id: np.ndarray, cut: Cutoffs) -> pa.Table:
    """One row per period: its bounds, events, distinct users and items (the ``periods`` dataset)."""
    from qarm_core.schemas import PERIODS_SCHEMA

    period = cut.period_of(ts)
    starts = [None, cut.valid_start, cut.test_start]
    ends = [cut.valid_start, cut.test_start, None]
    rows = []
    for i, name in enumerate(PERIODS):
        m = period == i
        rows.append({"period": name, "start_ts": starts[i], "end_ts": ends[i], "events": int(m.sum()),
                     "users": count_distinct(user_id[m]), "items": count_distinct(item_id[m]),
                     "source": cut.source})
    return pa.Table.from_pylist(rows, schema=PERIODS_SCHEMA.schema)


def cutoffs_from_periods(periods: pa.Table, dataset: str = "periods") -> Cutoffs:
    """The cutoffs recorded in a ``periods`` table (as the split stage wrote it)."""
    rows = {r["period"]: r for r in periods.to_pylist()}
    try:
        return Cutoffs(int(rows["valid"]["start_ts"]), int(rows["test"]["start_ts"]), rows["valid"]["source"])
    except (KeyError, TypeError):
        raise DataError("rank", dataset, f"not a periods table (period, start_ts, ...): {periods.to_pylist()}") from None


def split_events(interactions: pa.Table, cfg: SplitConfig, dataset: str = "interactions"
                 ) -> tuple[dict[str, pa.Table], dict]:
    """The split stage: ``{"train_events", "valid_events", "periods"}`` tables and a report.

    Events are ordered by ``(ts, user_id, item_id, rating, label)`` so that a period's table depends
    only on that period's events, never on the order of the input or on other periods' events.
    """
    import pyarrow.compute as pc

    from qarm_core.schemas import INTERACTIONS

    missing = {"user_id", "item_id", "ts"} - set(interactions.column_names)
    if missing:
        raise DataError(STAGE, dataset, f"missing column(s) {sorted(missing)}")
    events = interactions.select(INTERACTIONS.columns)
    order = pc.sort_indices(events, sort_keys=[(c, "ascending") for c in ("ts", "user_id", "item_id", "rating", "label")],
                            )
    events = events.take(order)
    ts = events["ts"].to_numpy()
    cut = resolve_cutoffs(ts, cfg, dataset)
    period = cut.period_of(ts)
    periods = describe_periods(ts, events["user_id"].to_numpy(), events["item_id"].to_numpy(), cut)
    tables = {"train_events": events.filter(pa.array(period == 0)),
              "valid_events": events.filter(pa.array(period == 1)), "periods": periods}
    report: dict = {"cutoff.valid_start": cut.valid_start, "cutoff.test_start": cut.test_start,
                    "notes": {"split.source": cut.source}}
    for r in periods.to_pylist():
        for k in ("events", "users", "items"):
            report[f"{r['period']}.{k}"] = r[k]
    return tables, report


def split_gate(periods: pa.Table, min_train_events: int, min_valid_events: int, stage: str = STAGE):
    """The gate on the split -> mine edge (dataset ``periods``): the training and validation periods
    hold enough events for the stages that learn and choose on them."""
    from qarm_core.gates import Check, GateResult

    rows = {r["period"]: r for r in periods.to_pylist()}
    checks = []
    for name, need in (("train", min_train_events), ("valid", min_valid_events)):
        got = int(rows.get(name, {}).get("events") or 0)
        checks.append(Check("expect_period_events_to_be_at_least", {"period": name, "min": need}, got >= need,
                            int(got < need), observed=got, engine="qarm"))
    return GateResult(stage, "periods", periods.num_rows, checks)
