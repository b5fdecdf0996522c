"""Bad inputs through the standalone commands, as a hostile but fair tester would feed them: every one
is refused with exit status 2 and a one-line error that names the stage, the dataset and the rule (or
a usage error for a bad option), never a traceback and never an output written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
RNG = np.random.default_rng(0)
GOOD = RNG.standard_normal((300, 8)).astype(np.float32)
LOG = dict(user_id=pa.array([1, 1, 2, 2, 3, 3], pa.int64()), item_id=pa.array([1, 2, 1, 2, 1, 2], pa.int64()),
           ts=pa.array([1, 2, 3, 4, 5, 6], pa.int64()), rating=pa.array([5.0] * 6, pa.float32()))
USAGE = "Invalid value"     # a refused option (typer/click's rule, on qarm's one error line; exit 2)


def _vectors(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])


def _emb(ids, x, id_type=pa.int64()) -> pa.Table:
    vec = x if isinstance(x, pa.Array) else _vectors(np.asarray(x, np.float32))
    return pa.table({"item_id": pa.array(ids, id_type), "vector": vec})


def _poke(x: np.ndarray, value: float, at: int = 3) -> np.ndarray:
    y = x.copy()
    y.flat[at] = value
    return y


def _zero_row(x: np.ndarray, row: int = 5) -> np.ndarray:
    y = x.copy()
    y[row] = 0.0
    return y


# name -> (input: a table, text or bytes written to the file, or None for a missing file; extra args; fragment)
QUANTIZE = {
    "missing file": (None, [], "embeddings not found"),
    "not parquet": (b"hello", [], "unreadable embeddings file"),
    "nan vector": (_emb(range(300), _poke(GOOD, np.nan)), [], "hold NaN/inf"),
    "inf vector": (_emb(range(300), _poke(GOOD, np.inf)), [], "hold NaN/inf"),
    "-inf vector": (_emb(range(300), _poke(GOOD, -np.inf)), [], "hold NaN/inf"),
    "zero vector": (_emb(range(300), _zero_row(GOOD)), [], "1 of 300 embeddings are all zeros"),
    "all zero": (_emb(range(300), np.zeros_like(GOOD)), [], "300 of 300 embeddings are all zeros"),
    "duplicate ids": (_emb([1, 1] + list(range(2, 300)), GOOD), [], "duplicate item ids"),
    "string ids": (_emb([f"a{i}" for i in range(300)], GOOD, pa.string()), [], "item_id has type string"),
    "float ids": (_emb([float(i) for i in range(300)], GOOD, pa.float64()), [], "item_id has type double"),
    "null id": (_emb([None] + list(range(1, 300)), GOOD), [], "null item ids"),
    "ragged vectors": (_emb(range(3), pa.array([[1.0, 2.0], [1.0], [3.0, 4.0]], pa.list_(pa.float32()))), [],
                       "vectors have different lengths"),
    "no vector column": (pa.table({"item_id": [1]}), [], "needs columns item_id, vector"),
    "no id column": (pa.table({"vector": pa.array([[1.0]], pa.list_(pa.float32()))}), [], "needs columns item_id, vector"),
    "string vectors": (pa.table({"item_id": [1], "vector": ["1,2"]}), [], "expected a list of floats"),
    "fewer items than K": (_emb(range(5), GOOD[:5]), [], "5 items is fewer than K=8"),
    "one item": (_emb([1], GOOD[:1]), [], "1 items is fewer than K=8"),
    "dim below fsq_dims": (_emb(range(300), GOOD[:, :1]), [], "fsq_dims=2 exceeds the embedding dim 1"),
    "fsq_dims above dim": (_emb(range(300), GOOD), ["--fsq-dims", "20"], "fsq_dims=20 exceeds the embedding dim 8"),
    "K above items": (_emb(range(300), GOOD), ["--levels", "4096,4"], "fewer than K=4096"),
    "one level": (_emb(range(300), GOOD), ["--levels", "8"], USAGE),
    "levels not numbers": (_emb(range(300), GOOD), ["--levels", "a,b"], USAGE),
    "level K=0": (_emb(range(300), GOOD), ["--levels", "0,4"], USAGE),
    "level K=1": (_emb(range(300), GOOD), ["--levels", "1,4"], USAGE),
    "fsq_dims 0": (_emb(range(300), GOOD), ["--fsq-dims", "0"], USAGE),
    "fsq_levels 1": (_emb(range(300), GOOD), ["--fsq-levels", "1"], USAGE),
    "niter 0": (_emb(range(300), GOOD), ["--niter", "0"], USAGE),
    "frozen without previous": (_emb(range(300), GOOD), ["--frozen"], USAGE),
    "previous missing": (_emb(range(300), GOOD), ["--previous", "/nonexistent/qarm"], "unreadable codebook"),
    "previous not a codebook": (_emb(range(300), GOOD), ["--previous", "."], "unreadable codebook"),
}


def _log(**change) -> pa.Table:
    cols = {**LOG, **change}
    return pa.table({k: v for k, v in cols.items() if v is not None})


PAIRS_SWING = {
    "missing file": (None, [], "input file not found"),
    "empty csv": ("", [], "input file is empty"),
    "header only": ("user_id,item_id,ts,rating\n", [], "holds no rows"),
    "not parquet": (b"garbage", [], "unreadable Parquet file"),
    "no ts column": (_log(ts=None), [], "missing required column(s) ['ts']"),
    "no user column": (_log(user_id=None), [], "missing required column(s) ['user_id']"),
    "no rating or label": (_log(rating=None), [], "needs a 'rating' or a 'label' column"),
    "string user ids": (_log(user_id=pa.array(list("abcdef"))), [], "column 'user_id' has type string"),
    "fractional item ids": (_log(item_id=pa.array([1.5] * 6)), [], "column 'item_id' has type double"),
    "nan rating": (_log(rating=pa.array([np.nan] + [5.0] * 5, pa.float32())), [], "to_be_finite(column='rating')"),
    "inf rating": (_log(rating=pa.array([np.inf] + [5.0] * 5, pa.float32())), [], "column='rating'"),
    "negative rating": (_log(rating=pa.array([-1.0] + [5.0] * 5, pa.float32())), [], "between(column='rating'"),
    "rating above range": (_log(rating=pa.array([7.0] + [5.0] * 5, pa.float32())), [], "between(column='rating'"),
    "null user": (_log(user_id=pa.array([None, 1, 2, 2, 3, 3], pa.int64())), [], "not_be_null(column='user_id')"),
    "null item": (_log(item_id=pa.array([None, 2, 1, 2, 1, 2], pa.int64())), [], "not_be_null(column='item_id')"),
    "null ts": (_log(ts=pa.array([None, 2, 3, 4, 5, 6], pa.int64())), [], "not_be_null(column='ts')"),
    "millisecond ts": (_log(ts=pa.array([1_600_000_000_000 + i for i in range(6)], pa.int64())), [],
                       "between(column='ts'"),
    "negative ts": (_log(ts=pa.array([-5, 2, 3, 4, 5, 6], pa.int64())), [], "between(column='ts'"),
    "nan ts": (_log(ts=pa.array([np.nan, 2, 3, 4, 5, 6])), [], "offending values: [nan]"),
    "duplicate events": (_log(ts=pa.array([1, 1, 3, 4, 5, 6], pa.int64()), item_id=pa.array([1, 1, 1, 2, 1, 2], pa.int64())),
                         [], "compound_columns_to_be_unique"),
    "label 2": (_log(rating=None, label=pa.array([2, 1, 1, 1, 1, 1], pa.int8())), [], "be_in_set(column='label'"),
    "user id overflow": (_log(user_id=pa.array([2 ** 63 + 1, 1, 2, 2, 3, 3], pa.uint64())), [],
                         "offending values: [9223372036854775809]"),
    "semicolon csv": ("user_id;item_id;ts;rating\n1;2;3;4\n", [], "missing required column(s)"),
    "text rating": ("user_id,item_id,ts,rating\n1,2,3,five\n", [], "column 'rating' has type string"),
    "non-utf8 csv": (b"user_id,item_id,ts,rating\n1,2,3,\xff\n", [], "must be UTF-8"),
    "min rating above all": (_log(), ["--min-rating", "10"], "no events pass min_rating=10.0"),
    "no pairs": (_log(), ["--min-user-items", "50"], "[stage=pairs-swing, dataset=pairs] no pairs"),
    "top_k 0": (_log(), ["--top-k", "0"], USAGE),
    "negative beta": (_log(), ["--beta", "-1"], USAGE),
    "rating range inverted": (_log(), ["--rating-min", "5", "--rating-max", "1"], USAGE),
}


def _write(path: Path, content) -> Path:
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    return path


def _check(res, fragment: str, stage: str, dataset: str | None, out: Path) -> None:
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)   # no traceback
    assert fragment in text, res.output
    # every refusal, a refused option too: stage, dataset (for an option: the option) and rule on
    # one line (rich prints it unwrapped), after any progress lines
    assert f"error: [stage={stage}, dataset=" in text
    line = [ln for ln in res.output.splitlines() if "error: [stage=" in ln]
    assert len(line) == 1 and fragment in " ".join(line[0].split()), res.output
    if fragment is not USAGE and dataset is not None:
        assert f"[stage={stage}, dataset={dataset}]" in text or "dataset=codebook]" in text
    assert not out.exists()


def test_the_tables_hold_at_least_sixty_cases():
    assert len(QUANTIZE) + len(PAIRS_SWING) >= 60


@pytest.mark.parametrize("case", list(QUANTIZE))
def test_quantize_refuses(case, tmp_path):
    content, extra, fragment = QUANTIZE[case]
    path = _write(tmp_path / "emb.parquet", content) if content is not None else tmp_path / "missing.parquet"
    out = tmp_path / "out"
    res = runner.invoke(app, ["quantize", "--embeddings", str(path), "--levels", "8,4", "--fsq-dims", "2",
                              "--out", str(out), *extra])
    _check(res, fragment, "quantize", "embeddings", out)


@pytest.mark.parametrize("case", list(PAIRS_SWING))
def test_pairs_swing_refuses(case, tmp_path):
    content, extra, fragment = PAIRS_SWING[case]
    suffix = ".csv" if isinstance(content, (str, bytes)) and case != "not parquet" else ".parquet"
    path = _write(tmp_path / f"log{suffix}", content) if content is not None else tmp_path / "missing.parquet"
    out = tmp_path / "pairs.parquet"
    res = runner.invoke(app, ["pairs", "swing", "--interactions", str(path), "--out", str(out), *extra])
    _check(res, fragment, "pairs-swing", None, out)


# ---------------------------------------------------------------- qarm ingest (one published home)
def _events(n: int = 150) -> list[str]:
    """``n`` good interaction rows (the tiny config's gate wants >= 100) over items 1..12."""
    return [f"{1 + i // 10},{1 + i % 12},{1000 + i},{1 + i % 5}" for i in range(n)]


EVENTS_HEAD = "user_id,item_id,ts,rating"
GOOD_EVENTS = "\n".join([EVENTS_HEAD, *_events()]) + "\n"
ITEMS_HEAD = "item_id,title,year,description"
GOOD_ITEMS = "\n".join([ITEMS_HEAD, *(f"{i},Movie {i},199{i % 10},a film" for i in range(1, 13))]) + "\n"


def _events_with(*rows: str, head: str = EVENTS_HEAD) -> str:
    return "\n".join([head, *_events(), *rows]) + "\n"


def _items_with(*rows: str, head: str = ITEMS_HEAD) -> str:
    return "\n".join([head, *GOOD_ITEMS.splitlines()[1:], *rows]) + "\n"


# name -> (interactions content, items content, extra args, dataset named, fragment); None: a missing file
INGEST = {
    "events missing": (None, GOOD_ITEMS, [], "interactions", "not found"),
    "items missing": (GOOD_EVENTS, None, [], "items", "not found"),
    "events empty": ("", GOOD_ITEMS, [], "interactions", "input file is empty"),
    "items empty": (GOOD_EVENTS, "", [], "items", "input file is empty"),
    "events header only": (EVENTS_HEAD + "\n", GOOD_ITEMS, [], "interactions", "holds no rows"),
    "events not parquet": (b"PAR1 not parquet", GOOD_ITEMS, [], "interactions", "unreadable Parquet"),
    "events no ts": ("user_id,item_id,rating\n1,2,3\n", GOOD_ITEMS, [], "interactions", "missing required column(s) ['ts']"),
    "events no rating or label": ("user_id,item_id,ts\n1,2,3\n", GOOD_ITEMS, [], "interactions",
                                  "needs a 'rating' or a 'label' column"),
    "events text item id": (_events_with("1,abc,5000,4"), GOOD_ITEMS, [], "interactions",
                            "column 'item_id' has type string"),
    "events text rating": (_events_with("1,2,5000,five"), GOOD_ITEMS, [], "interactions", "offending values: ['five']"),
    "events fractional user": (_events_with("1.5,2,5000,4"), GOOD_ITEMS, [], "interactions", "offending values: ['1.5']"),
    "events nan rating": (_events_with("1,2,5000,nan"), GOOD_ITEMS, [], "interactions", "to_be_finite(column='rating')"),
    "events inf rating": (_events_with("1,2,5000,inf"), GOOD_ITEMS, [], "interactions", "column='rating'"),
    "events rating above range": (_events_with("1,2,5000,9"), GOOD_ITEMS, [], "interactions", "between(column='rating'"),
    "events negative rating": (_events_with("1,2,5000,-1"), GOOD_ITEMS, [], "interactions", "between(column='rating'"),
    "events null user": (_events_with(",2,5000,4"), GOOD_ITEMS, [], "interactions", "not_be_null(column='user_id')"),
    "events null ts": (_events_with("1,2,,4"), GOOD_ITEMS, [], "interactions", "not_be_null(column='ts')"),
    "events millisecond ts": (_events_with("1,2,1600000000000,4"), GOOD_ITEMS, [], "interactions", "between(column='ts'"),
    "events negative ts": (_events_with("1,2,-5,4"), GOOD_ITEMS, [], "interactions", "between(column='ts'"),
    "events duplicate": (_events_with("1,1,1000,4"), GOOD_ITEMS, [], "interactions", "compound_columns_to_be_unique"),
    "events unknown item": (_events_with("1,999,5000,4"), GOOD_ITEMS, [], "interactions", "in_catalog"),
    "events user id overflow": (_events_with("9223372036854775809,2,5000,4"), GOOD_ITEMS, [], "interactions",
                                "offending values: ['9223372036854775809']"),
    "events label 2": ("user_id,item_id,ts,label\n" + "".join(f"{1 + i // 10},{1 + i % 12},{1000 + i},{i % 2}\n"
                                                              for i in range(150)) + "1,2,5000,2\n",
                       GOOD_ITEMS, [], "interactions", "be_in_set(column='label'"),
    "events non-utf8": (GOOD_EVENTS.encode() + b"1,2,5000,\xff\n", GOOD_ITEMS, [], "interactions", "must be UTF-8"),
    "events semicolons": (GOOD_EVENTS.replace(",", ";"), GOOD_ITEMS, [], "interactions", "missing required column(s)"),
    "events too few": ("\n".join([EVENTS_HEAD, *_events(20)]) + "\n", GOOD_ITEMS, [], "interactions",
                      "row_count_to_be_between(min_value=100"),
    "items no title": (GOOD_EVENTS, "item_id,year\n1,1990\n", [], "items", "missing required column(s) ['title']"),
    "items duplicate id": (GOOD_EVENTS, _items_with("3,Another,1995,x"), [], "items", "compound_columns_to_be_unique"),
    "items null id": (GOOD_EVENTS, _items_with(",Nobody,1995,x"), [], "items", "not_be_null(column='item_id')"),
    "items blank title": (GOOD_EVENTS, _items_with("13,   ,1995,x"), [], "items", "column='title'"),
    "items text id": (GOOD_EVENTS, _items_with("x13,T,1995,x"), [], "items", "column 'item_id' has type string"),
    "items year out of range": (GOOD_EVENTS, _items_with("13,T,3000,x"), [], "items", "between(column='year'"),
    "items long description": (GOOD_EVENTS, _items_with("13,T,1995," + "d" * 10_001), [], "items",
                                "lengths_to_be_between(column='description'"),
    "items non-utf8": (GOOD_EVENTS, GOOD_ITEMS.encode() + b"13,\xff,1995,x\n", [], "items", "must be UTF-8"),
    "tab delimiter on commas": (GOOD_EVENTS, GOOD_ITEMS, ["--delimiter", "\t"], "interactions",
                                "missing required column(s)"),
}


@pytest.fixture(scope="module")
def published_home(prefect_harness, tmp_path_factory):
    """A home where `qarm ingest` published the good files once; every bad case runs against it."""
    from tests.support.paths import TINY

    d = tmp_path_factory.mktemp("ingest")
    (d / "events.csv").write_text(GOOD_EVENTS)
    (d / "items.csv").write_text(GOOD_ITEMS)
    home = d / "home"
    res = runner.invoke(app, ["ingest", "--interactions", str(d / "events.csv"), "--items", str(d / "items.csv"),
                              "--config", TINY, "--set", f"home={home}"])
    assert res.exit_code == 0, res.output
    return home


def test_ingest_table_holds_thirty_cases():
    assert len(INGEST) >= 30


@pytest.mark.parametrize("case", list(INGEST))
def test_ingest_refuses(case, published_home, tmp_path):
    """Each bad file: exit 2, one error naming stage=ingest, the dataset and the rule, no traceback, and
    the published snapshot untouched (CURRENT byte for byte, no new snapshot)."""
    from qarm_core.storage import Storage
    from tests.support.paths import TINY

    events, items, extra, dataset, fragment = INGEST[case]
    suffix = ".parquet" if case == "events not parquet" else ".csv"
    ev = _write(tmp_path / f"events{suffix}", events) if events is not None else tmp_path / "missing.csv"
    it = _write(tmp_path / "items.csv", items) if items is not None else tmp_path / "missing_items.csv"
    pointer, snaps = (published_home / "CURRENT").read_bytes(), Storage(published_home).list_snapshots()
    res = runner.invoke(app, ["ingest", "--interactions", str(ev), "--items", str(it), "--config", TINY,
                              "--set", f"home={published_home}", *extra])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert f"[stage=ingest, dataset={dataset}]" in text and fragment in text, res.output
    assert f"error: [stage=ingest, dataset={dataset}]" in text      # the one-line error, after the logs
    assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1
    assert f"(full log: {published_home / 'logs'}/ingest-" in text   # where the traceback went
    assert (published_home / "CURRENT").read_bytes() == pointer
    assert Storage(published_home).list_snapshots() == snaps
