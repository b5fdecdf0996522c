"""What counts as a positive event: the one rule every stage applies (mining, the two-tower, the
judge's calibration, the embedding evaluation, the ranking labels, the CLI), and its one setting,
``events.positive_min_rating`` of the pipeline config (``EventsConfig``).

An event is positive when its ``rating`` is given and ``>= min_rating``; an event without a rating is
positive when its ``label`` is 1; an event with neither is not positive (the ranking samples, which
need a label for every event, refuse it).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from qarm_core.base import Strict
from qarm_core.errors import DataError

# The default threshold (ratings on a 1-5 scale, as ML-100K's): 4 and 5 are positives.
POSITIVE_MIN_RATING = 4.0


class EventsConfig(Strict):
    """The positive-event rule of every stage. A log without ratings uses ``label == 1`` whatever
    the threshold."""

    positive_min_rating: float = Field(POSITIVE_MIN_RATING, allow_inf_nan=False)


def positive_mask(events: pa.Table | pa.RecordBatch, min_rating: float | None, stage: str,
                  dataset: str = "interactions") -> np.ndarray:
    """``(n_events,)`` bool by the rule above; every event when ``min_rating`` is None."""
    n = events.num_rows
    if min_rating is None:
        return np.ones(n, bool)
    names = events.schema.names
    if "rating" not in names and "label" not in names:
        raise DataError(stage, dataset, f"needs a 'rating' or a 'label' column to tell positives; found {names}")
    has_rating = np.zeros(n, bool)
    positive = np.zeros(n, bool)
    if "rating" in names:
        rating = pc.cast(events.column("rating"), pa.float64())
        has_rating = pc.is_valid(rating).to_numpy(zero_copy_only=False)
        positive = pc.fill_null(pc.greater_equal(rating, min_rating), False).to_numpy(zero_copy_only=False)
    if "label" in names:
        label = pc.fill_null(pc.equal(pc.cast(events.column("label"), pa.int64()), 1), False)
        positive = np.where(has_rating, positive, label.to_numpy(zero_copy_only=False))
    return np.asarray(positive, bool)


def positive_sql(rating: str, label: str, min_rating: float) -> str:
    """The same rule as a DuckDB expression over columns ``rating`` and ``label`` (either may be a
    typed NULL literal): 1 or 0, NULL where an event has neither."""
    return (f"CASE WHEN {rating} IS NOT NULL THEN ({rating} >= {float(min_rating)})::TINYINT "
            f"WHEN {label} IS NOT NULL THEN ({label} = 1)::TINYINT END")
