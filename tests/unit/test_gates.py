import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qarm_core.config import DuckDBConfig, GatesConfig, parse_config
from qarm_core.errors import GateError
from qarm_core.gates import run_gate
from qarm_core.schemas import INTERACTIONS, ITEMS
from qarm_core.storage import DatasetRecord, write_parquet_dataset

GATES = parse_config({"gates": {"interactions": {"min_rows": 1, "max_rows": 100, "rating_min": 1.0,
                                                  "rating_max": 5.0},
                                "items": {"min_rows": 1, "max_rows": 100, "max_title_chars": 20}}}).gates
DUCK = DuckDBConfig(memory_limit="256MB", max_temp_directory_size="256MB", threads=1)


def _write(tmp_path, name, schema, cols) -> DatasetRecord:
    n = len(next(iter(cols.values())))
    full = {f.name: cols.get(f.name, [None] * n) for f in schema.schema}
    t = pa.table(full, schema=schema.schema)
    return write_parquet_dataset(tmp_path / name, iter(t.to_batches()), schema)


def _items(tmp_path, **over):
    cols = {"item_id": [1, 2, 3], "title": ["a", "b", "c"], "year": [1999, None, 2001]}
    return _write(tmp_path, "items", ITEMS, {**cols, **over})


def _inter(tmp_path, **over):
    cols = {"user_id": [1, 1, 2, 3], "item_id": [1, 2, 2, 3], "ts": [10, 11, 12, 13],
            "rating": [4.0, 5.0, 1.0, 3.0]}
    return _write(tmp_path, "interactions", INTERACTIONS, {**cols, **over})


def _gate(rec, catalog=None, cfg: GatesConfig = GATES):
    return run_gate("ingest", rec, cfg, DUCK, rec.path + "_tmp", catalog=catalog)


def test_good_data_passes(tmp_path):
    items = _items(tmp_path)
    r = _gate(_inter(tmp_path), catalog=items)
    assert r.success and r.rows == 4 and len(r.checks) >= 10
    assert _gate(items).success


def _failed(result, expectation):
    [f] = [c for c in result.failures if c.expectation == expectation]
    return f


def test_null_ids_fail_with_offending_rows(tmp_path):
    r = _gate(_inter(tmp_path, user_id=[1, None, 2, None]))
    f = _failed(r, "expect_column_values_to_not_be_null")
    assert f.kwargs["column"] == "user_id" and f.unexpected_count == 2
    assert [row["ts"] for row in f.sample] == [11, 13] and f.sample[0]["user_id"] is None
    with pytest.raises(GateError) as ei:
        r.raise_if_failed()
    msg = str(ei.value)
    assert msg.startswith("[stage=ingest, dataset=interactions] gate failed")
    assert "expect_column_values_to_not_be_null(column='user_id')" in msg and "'ts': 11" in msg


def test_duplicate_keys(tmp_path):
    r = _gate(_inter(tmp_path, user_id=[1, 1, 2, 2], item_id=[1, 1, 2, 2], ts=[10, 10, 12, 12]))
    f = _failed(r, "expect_compound_columns_to_be_unique")
    assert f.unexpected_count == 4 and len(f.sample) == 4
    items = _gate(_items(tmp_path, item_id=[1, 1, 3]))
    assert _failed(items, "expect_compound_columns_to_be_unique").unexpected_count == 2


def test_ranges_and_sets(tmp_path):
    r = _gate(_inter(tmp_path, rating=[4.0, 9.0, None, None], label=[None, None, 1, 7], ts=[10, 11, -5, 13]))
    assert not r.success
    f = [c for c in r.failures if c.expectation == "expect_column_values_to_be_between"]
    assert {c.kwargs["column"]: c.unexpected_count for c in f} == {"rating": 1, "ts": 1}
    assert _failed(r, "expect_column_values_to_be_in_set").sample[0]["label"] == 7


def test_rating_or_label_required_per_row(tmp_path):
    r = _gate(_inter(tmp_path, rating=[4.0, None, 3.0, 2.0]))
    assert _failed(r, "expect_rating_or_label_to_be_present").unexpected_count == 1


def test_row_count_bounds(tmp_path):
    cfg = parse_config({"gates": {"interactions": {"min_rows": 5, "max_rows": 100}}}).gates
    r = _gate(_inter(tmp_path), cfg=cfg)
    f = _failed(r, "expect_table_row_count_to_be_between")
    assert f.observed == 4 and f.kwargs == {"min_value": 5, "max_value": 100}


def test_orphan_item_ids(tmp_path):
    items = _items(tmp_path)
    r = _gate(_inter(tmp_path, item_id=[1, 2, 77, 3]), catalog=items)
    f = _failed(r, "expect_item_ids_to_be_in_catalog")
    assert f.unexpected_count == 1 and f.sample[0]["item_id"] == 77


def test_item_titles(tmp_path):
    r = _gate(_items(tmp_path, title=["ok", "", "x" * 21]))
    f = _failed(r, "expect_column_value_lengths_to_be_between")
    assert f.unexpected_count == 2
    r2 = _gate(_items(tmp_path / "b", title=["ok", None, "fine"]))
    assert _failed(r2, "expect_column_values_to_not_be_null").kwargs["column"] == "title"


def test_foreign_schema_is_reported_first(tmp_path):
    (tmp_path / "x").mkdir()
    pq.write_table(pa.table({"item_id": pa.array([1], pa.int32()), "title": ["a"]}), tmp_path / "x" / "p.parquet")
    rec = DatasetRecord("items", str(tmp_path / "x"), 1, ITEMS.version, "f", ("p.parquet",))
    r = _gate(rec)
    assert [c.expectation for c in r.checks] == ["expect_schema_to_match"] and not r.success


def test_empty_dataset_fails_row_count(tmp_path):
    rec = write_parquet_dataset(tmp_path / "items", iter([]), ITEMS)
    r = _gate(rec)
    assert r.rows == 0 and [c.expectation for c in r.failures] == ["expect_table_row_count_to_be_between"]


def test_batches_accumulate(tmp_path):
    """Row-level checks run per batch: counts and samples add up across batches."""
    cfg = GATES.model_copy(update={"batch_rows": 2, "sample_rows": 3})
    r = _gate(_inter(tmp_path, user_id=[None, 1, None, None]), cfg=cfg)
    f = _failed(r, "expect_column_values_to_not_be_null")
    assert f.unexpected_count == 3 and [row["ts"] for row in f.sample] == [10, 12, 13]


def test_nan_ratings_fail(tmp_path):
    r = _gate(_inter(tmp_path, rating=[4.0, float("nan"), 3.0, 2.0]))
    f = _failed(r, "expect_column_values_to_be_finite")
    assert f.unexpected_count == 1 and f.sample[0]["rating"] == "nan"


def test_blank_titles_and_years(tmp_path):
    r = _gate(_items(tmp_path, title=["ok", "   ", "fine"], year=[1999, 3000, None]))
    assert _failed(r, "expect_column_values_to_match_regex").unexpected_count == 1
    yr = [c for c in r.failures if c.expectation == "expect_column_values_to_be_between"]
    assert yr[0].kwargs["column"] == "year" and yr[0].unexpected_count == 1


def test_long_values_are_cut_in_samples(tmp_path):
    r = _gate(_items(tmp_path, title=["ok", "y" * 5000, "fine"]))
    f = _failed(r, "expect_column_value_lengths_to_be_between")
    assert len(f.sample[0]["title"]) < 300 and "more chars" in f.sample[0]["title"]


def test_nan_in_a_row_group_whose_statistics_omit_it(tmp_path):
    """DuckDB prunes row groups by min/max stats that leave NaN out; the gate must still see it."""
    r = _gate(_inter(tmp_path, rating=[float("nan"), 4.0, 4.0, 4.0]))
    assert _failed(r, "expect_column_values_to_be_finite").unexpected_count == 1


def _pairs(tmp_path, **over):
    from qarm_core.schemas import PAIRS
    cols = {"src_item": [1, 1, 2], "dst_item": [2, 3, 1], "score": [0.5, 0.25, 0.5],
            "source": ["swing", "swing", "u2i"]}
    return _write(tmp_path, "pairs", PAIRS, {**cols, **over})


def test_pairs_gate(tmp_path):
    items = _items(tmp_path)
    assert _gate(_pairs(tmp_path / "ok"), catalog=items).success
    r = _gate(_pairs(tmp_path / "bad", src_item=[1, 2, 9], dst_item=[1, 3, 1],
                     score=[0.5, float("inf"), 0.1], source=["swing", "swing", "llm"]), catalog=items)
    failed = {(c.expectation, c.kwargs.get("column")): c.unexpected_count for c in r.failures}
    assert failed == {("expect_no_self_pairs", None): 1, ("expect_item_ids_to_be_in_catalog", "src_item"): 1,
                      ("expect_column_values_to_be_finite", "score"): 1,
                      ("expect_column_values_to_be_in_set", "source"): 1}
    dup = _gate(_pairs(tmp_path / "dup", src_item=[1, 1, 2], dst_item=[2, 2, 1]), catalog=items)
    assert _failed(dup, "expect_compound_columns_to_be_unique").unexpected_count == 2
