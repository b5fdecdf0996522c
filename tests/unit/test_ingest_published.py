"""``ingest.source: published``: the interactions and items of the snapshot CURRENT names, the input
of `qarm refresh --set ingest.source=published` after `qarm ingest`."""

import pyarrow as pa
import pytest

from qarm_core.errors import DataError
from qarm_core.ingest import IngestConfig, resolve_source
from qarm_core.schemas import INTERACTIONS, ITEMS
from qarm_core.storage import Storage, write_parquet_dataset

PUBLISHED = IngestConfig(source="published")


def _tables(n_items: int = 5):
    inter = pa.table({"user_id": pa.array([1, 1, 2], pa.int64()), "item_id": pa.array([1, 2, 3], pa.int64()),
                      "ts": pa.array([10, 11, 12], pa.int64()), "rating": pa.array([4.0, 5.0, 3.0], pa.float32()),
                      "label": pa.nulls(3, pa.int8())}, schema=INTERACTIONS.schema)
    items = pa.table({"item_id": pa.array(range(1, n_items + 1), pa.int64()),
                      "title": [f"t{i}" for i in range(n_items)], "year": pa.nulls(n_items, pa.int32()),
                      "tags": pa.array([["a"]] * n_items, pa.list_(pa.string())),
                      "description": pa.nulls(n_items, pa.string())}, schema=ITEMS.schema)
    return inter, items


def _publish(home, tag: str, tables, names=("interactions", "items")) -> None:
    st = Storage(home).ensure()
    schemas = {"interactions": INTERACTIONS, "items": ITEMS}
    recs = {n: write_parquet_dataset(st.work_dir / tag / n, t.to_batches(), schemas[n])
            for n, t in zip(("interactions", "items"), tables) if n in names}
    st.publish(recs)


def _read(fns) -> dict[str, pa.Table]:
    return {n: pa.Table.from_batches(list(fn())) for n, fn in fns.items()}


def test_published_source_reads_current_and_fingerprints_its_content(tmp_path):
    home = tmp_path / "home"
    inter, items = _tables()
    _publish(home, "a", (inter, items))
    fp, fns = resolve_source(PUBLISHED, home)
    got = _read(fns)
    assert got["interactions"].equals(inter) and got["items"].equals(items)
    _publish(home, "b", (inter, items))                          # the same content again: the same key
    assert resolve_source(PUBLISHED, home)[0] == fp
    _publish(home, "c", _tables(n_items=6))                      # new items: a new key
    fp2, fns2 = resolve_source(PUBLISHED, home)
    assert fp2 != fp and _read(fns2)["items"].num_rows == 6


def test_published_source_names_what_is_missing(tmp_path):
    home = tmp_path / "home"
    with pytest.raises(DataError, match=r"\[stage=ingest, dataset=interactions\] ingest.source is 'published' "
                                        r"but nothing is published under .*: run qarm ingest first"):
        resolve_source(PUBLISHED, home)
    _publish(home, "a", _tables(), names=("interactions",))
    with pytest.raises(DataError, match=r"\[stage=ingest, dataset=items\] .* has no items"):
        resolve_source(PUBLISHED, home)


def test_published_is_a_valid_source_value():
    from qarm_core.config import parse_config

    assert parse_config({"ingest": {"source": "published"}}).ingest.source == "published"


def test_a_refresh_reads_the_snapshot_it_started_from(tmp_path):
    """A refresh pins the snapshot current at its start: what CURRENT names later (another
    publish) does not change what its stages read; None: nothing was published then."""
    from qarm_core.storage import CURRENT_AT_READ

    home = tmp_path / "home"
    _publish(home, "a", _tables())
    started_from = Storage(home).current().snapshot_id
    _publish(home, "c", _tables(n_items=6))
    assert _read(resolve_source(PUBLISHED, home, started_from)[1])["items"].num_rows == 5
    assert _read(resolve_source(PUBLISHED, home, CURRENT_AT_READ)[1])["items"].num_rows == 6
    with pytest.raises(DataError, match="nothing is published"):
        resolve_source(PUBLISHED, home, None)
    pinned, live = Storage(home).as_of(started_from), Storage(home)
    assert pinned.published("items").rows == 5 and live.published("items").rows == 6
    assert pinned.base().snapshot_id == started_from != live.base().snapshot_id
    assert Storage(home).as_of(None).published("items") is None and live.as_of(CURRENT_AT_READ) is live
