"""Deterministic synthetic interaction logs at any scale, generated block by block.

Item popularity is Zipf-distributed (p(rank r) ∝ r^-s) over a seeded permutation of item ids, user
activity is milder Zipf (exponent 0.5), and item text comes from templates. Output depends only on
the arguments (never on how the caller batches or writes it), and memory stays bounded by one block
(~1M rows) plus the popularity CDF (8 bytes per item).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import pyarrow as pa

from qarm_core.schemas import INTERACTIONS, ITEMS

BLOCK_ROWS = 1_000_000
USER_ZIPF = 0.5
T0 = 1_700_000_000  # 2023-11-14, an arbitrary fixed epoch for synthetic time

_CATEGORIES = np.array(["Kitchen", "Garden", "Toys", "Books", "Sports", "Beauty", "Audio", "Camera",
                        "Office", "Pet", "Travel", "Music", "Fashion", "Tools", "Grocery", "Games"])
_ADJECTIVES = np.array(["Compact", "Classic", "Deluxe", "Portable", "Smart", "Vintage", "Organic",
                        "Wireless", "Handmade", "Premium", "Ultra", "Eco", "Mini", "Pro", "Family",
                        "Travel-size"])
_NOUNS = np.array(["Kettle", "Lamp", "Backpack", "Notebook", "Speaker", "Blender", "Jacket", "Puzzle",
                   "Camera", "Planter", "Mug", "Headphones", "Watch", "Sneakers", "Drill", "Board Game"])
_MATERIALS = np.array(["steel", "bamboo", "cotton", "ceramic", "recycled plastic", "oak", "glass",
                       "leather"])


@dataclass(frozen=True)
class SynthSpec:
    users: int
    items: int
    interactions: int
    seed: int = 0
    zipf_exponent: float = 1.1

    def __post_init__(self) -> None:
        for name in ("users", "items", "interactions"):
            if getattr(self, name) < 1:
                raise ValueError(f"synth: {name} must be >= 1, got {getattr(self, name)}")
        if self.zipf_exponent <= 0:
            raise ValueError(f"synth: zipf_exponent must be > 0, got {self.zipf_exponent}")


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return cdf


def _rank_to_id(n: int, seed: int, salt: int) -> np.ndarray:
    """A seeded permutation so that popular ids are scattered rather than 0, 1, 2, ..."""
    return np.random.default_rng([seed, salt]).permutation(n).astype(np.int64)


def _item_batch(seed: int, ids: np.ndarray, rng: np.random.Generator) -> pa.RecordBatch:
    n = len(ids)
    cat = _CATEGORIES[rng.integers(0, len(_CATEGORIES), n)]
    adj = _ADJECTIVES[rng.integers(0, len(_ADJECTIVES), n)]
    noun = _NOUNS[rng.integers(0, len(_NOUNS), n)]
    mat = _MATERIALS[rng.integers(0, len(_MATERIALS), n)]
    year = rng.integers(1990, 2026, n).astype(np.int32)
    title = np.char.add(np.char.add(np.char.add(adj, " "), noun), np.char.add(" #", ids.astype(str)))
    desc = np.char.add(np.char.add(np.char.add(np.char.add("A ", np.char.lower(adj)), " "),
                                   np.char.lower(noun)), np.char.add(" made of ", mat))
    tags = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), _text(cat))
    return pa.RecordBatch.from_arrays(
        [pa.array(ids), _text(title), pa.array(year), tags, _text(desc)], schema=ITEMS.schema)


def iter_synthetic_items(spec: SynthSpec) -> Iterator[pa.RecordBatch]:
    """Item batches, ids ``0..items-1``, with a title, a category tag and a description."""
    for start in range(0, spec.items, BLOCK_ROWS):
        n = min(BLOCK_ROWS, spec.items - start)
        yield _item_batch(spec.seed, np.arange(start, start + n, dtype=np.int64),
                          np.random.default_rng([spec.seed, 1, start]))


def _text(values: np.ndarray) -> pa.Array:
    arr = pa.array(values, type=pa.string())
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def iter_synthetic_interactions(spec: SynthSpec) -> Iterator[pa.RecordBatch]:
    """Interaction batches: Zipf items, Zipf-ish users, ratings 1-5, strictly increasing ts.

    Timestamps advance by at least one second per event, so (user_id, item_id, ts) is unique.
    """
    item_cdf = _zipf_cdf(spec.items, spec.zipf_exponent)
    user_cdf = _zipf_cdf(spec.users, USER_ZIPF)
    item_ids = _rank_to_id(spec.items, spec.seed, 2)
    user_ids = _rank_to_id(spec.users, spec.seed, 3)
    span = max(90 * 86_400, spec.interactions)
    for start in range(0, spec.interactions, BLOCK_ROWS):
        n = min(BLOCK_ROWS, spec.interactions - start)
        rng = np.random.default_rng([spec.seed, 4, start])
        items = item_ids[np.minimum(np.searchsorted(item_cdf, rng.random(n)), spec.items - 1)]
        users = user_ids[np.minimum(np.searchsorted(user_cdf, rng.random(n)), spec.users - 1)]
        rows = np.arange(start, start + n, dtype=np.int64)
        ts = T0 + (rows * span) // spec.interactions
        rating = rng.choice(np.array([1, 2, 3, 4, 5], dtype=np.float32), size=n,
                            p=[0.06, 0.11, 0.27, 0.34, 0.22])
        label = (rating >= 4).astype(np.int8)
        yield pa.RecordBatch.from_arrays(
            [pa.array(users), pa.array(items), pa.array(ts), pa.array(rating), pa.array(label)],
            schema=INTERACTIONS.schema)


@dataclass(frozen=True)
class GrowthSpec:
    """A later day of the log of ``base``: ``new_items`` items join the catalog (ids after the
    last one) and ``new_interactions`` events follow the last event of day ``day - 1``.

    Days chain: ``prior_items`` is how many items the growth days before this one added (their
    ids follow the base catalog's), so day 2 of a log grown by ``n`` items on day 1 has
    ``prior_items=n`` and its new ids start after day 1's (``GrowthSpec.next_day``)."""

    base: SynthSpec
    day: int = 1
    new_items: int = 0
    new_interactions: int = 0
    # How much more likely a new item is drawn than its share of the catalog: new items are what
    # a day's traffic discovers.
    new_item_boost: float = 3.0
    prior_items: int = 0

    def __post_init__(self) -> None:
        if (self.day < 1 or self.new_items < 0 or self.new_interactions < 0 or self.new_item_boost < 0
                or self.prior_items < 0):
            raise ValueError("synth growth: day >= 1, new_items >= 0, new_interactions >= 0, boost >= 0, "
                             "prior_items >= 0")

    @property
    def first_item(self) -> int:
        """The id of this day's first new item."""
        return self.base.items + self.prior_items

    def next_day(self) -> "GrowthSpec":
        """The following day, growing by as much as this one, its new ids after this day's."""
        return replace(self, day=self.day + 1, prior_items=self.prior_items + self.new_items)


def iter_growth_items(g: GrowthSpec) -> Iterator[pa.RecordBatch]:
    """The day's new items only (ids ``g.first_item ..``); the older ones are ``iter_synthetic_items(g.base)``
    and the earlier growth days'."""
    first = g.first_item
    for start in range(0, g.new_items, BLOCK_ROWS):
        n = min(BLOCK_ROWS, g.new_items - start)
        yield _item_batch(g.base.seed, np.arange(first + start, first + start + n, dtype=np.int64),
                          np.random.default_rng([g.base.seed, 5, g.day, start]))


def iter_growth_interactions(g: GrowthSpec) -> Iterator[pa.RecordBatch]:
    """The day's new events: the same users and item popularity as the base log (a popular item
    stays popular), the items of the growth days so far (this one's and ``prior_items``) drawn
    ``new_item_boost`` times their catalog share, timestamps after the base log's last event (day ``d``
    starts ``d`` spans after the base log began). Day 1 (no prior items) does not depend on later days."""
    b = g.base
    item_cdf = _zipf_cdf(b.items, b.zipf_exponent)
    user_cdf = _zipf_cdf(b.users, USER_ZIPF)
    item_ids = _rank_to_id(b.items, b.seed, 2)
    user_ids = _rank_to_id(b.users, b.seed, 3)
    span = max(90 * 86_400, b.interactions)
    # the items of every growth day so far, this one's included, are drawn as one "new" pool
    grown = g.prior_items + g.new_items
    p_new = min(1.0, g.new_item_boost * grown / max(g.first_item + g.new_items, 1)) if grown else 0.0
    t_start = T0 + g.day * span
    for start in range(0, g.new_interactions, BLOCK_ROWS):
        n = min(BLOCK_ROWS, g.new_interactions - start)
        rng = np.random.default_rng([b.seed, 6, g.day, start])
        items = item_ids[np.minimum(np.searchsorted(item_cdf, rng.random(n)), b.items - 1)]
        fresh = rng.random(n) < p_new
        items[fresh] = b.items + rng.integers(0, max(grown, 1), int(fresh.sum()))
        users = user_ids[np.minimum(np.searchsorted(user_cdf, rng.random(n)), b.users - 1)]
        rows = np.arange(start, start + n, dtype=np.int64)
        ts = t_start + (rows * span) // max(g.new_interactions, 1)
        rating = rng.choice(np.array([1, 2, 3, 4, 5], dtype=np.float32), size=n,
                            p=[0.06, 0.11, 0.27, 0.34, 0.22])
        yield pa.RecordBatch.from_arrays(
            [pa.array(users), pa.array(items), pa.array(ts), pa.array(rating), pa.array((rating >= 4).astype(np.int8))],
            schema=INTERACTIONS.schema)
