"""Ingestion: read ML-100K from the recbole wheel, a user's own CSV/Parquet files, a synthetic log, or
the interactions/items of the published snapshot, into the declared interactions/items schemas.

Every problem is raised as ``DataError(stage="ingest", dataset=..., ...)``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from qarm_core.base import Strict
from qarm_core.errors import DataError
from qarm_core.schemas import INTERACTIONS, ITEMS, DatasetSchema, schema_for
from qarm_core.storage import CURRENT_AT_READ


class ML100KSource(Strict):
    recbole_version: str = "1.2.1"
    # Where the downloaded recbole wheel is kept; default: <home>/cache/recbole.
    cache_dir: str | None = None


class FilesSource(Strict):
    interactions: str | None = None
    items: str | None = None
    # CSV only: the field separator (Parquet files carry their own schema).
    csv_delimiter: str = ","


class SynthSource(Strict):
    users: int = Field(1_000, ge=1)
    items: int = Field(5_000, ge=1)
    interactions: int = Field(100_000, ge=1)
    seed: int = 0
    zipf_exponent: float = Field(1.1, gt=0.0)


class IngestConfig(Strict):
    # published: the interactions and items of the snapshot CURRENT names (what `qarm ingest`
    # published), so that `qarm refresh --set ingest.source=published` refreshes from them.
    source: Literal["ml100k", "files", "synth", "published"] = "ml100k"
    ml100k: ML100KSource = ML100KSource()
    files: FilesSource = FilesSource()
    synth: SynthSource = SynthSource()
    # Cut item descriptions to this many characters while reading (None: keep them whole; the items
    # gate then rejects any longer than gates.items.max_description_chars).
    truncate_description_chars: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _files_given(self) -> "IngestConfig":
        if self.source == "files" and not (self.files.interactions and self.files.items):
            raise ValueError("ingest.source is 'files' but ingest.files.interactions and "
                             "ingest.files.items are not both set")
        return self


STAGE = "ingest"
ML100K_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
PARQUET_SUFFIXES = {".parquet", ".pq"}
CSV_SUFFIXES = {".csv", ".tsv", ".txt"}


# ---------------------------------------------------------------- ML-100K from the recbole wheel
def fetch_recbole_wheel(cache_dir: str | Path, version: str = "1.2.1", timeout_s: float = 300) -> Path:
    """The recbole wheel in ``cache_dir``, downloaded with ``pip download --no-deps`` if absent.

    recbole itself is never installed: only its wheel, which carries the ML-100K atomic files.
    """
    cache = Path(cache_dir)
    cached = sorted(cache.glob(f"recbole-{version}-*.whl"))
    if cached:
        return cached[0]
    cache.mkdir(parents=True, exist_ok=True)
    # a folder of this process's own: two processes fetching at once (two refreshes, two test
    # workers) never move each other's half-downloaded file
    tmp = cache / f".download-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"recbole=={version}", "-d", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DataError(STAGE, "ml100k", f"downloading the recbole {version} wheel timed out "
                                          f"after {timeout_s:.0f}s") from None
    wheels = sorted(tmp.glob(f"recbole-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DataError(STAGE, "ml100k", f"could not download the recbole {version} wheel "
                                          f"(pip exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    final = cache / wheels[0].name
    wheels[0].replace(final)  # same folder tree: an atomic rename, never a half-written wheel
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def _read_atomic_file(raw: bytes, dataset: str) -> pa.Table:
    """Read a recbole atomic file: tab-separated, header fields like ``user_id:token``."""
    header, _, body = raw.partition(b"\n")
    names = [h.split(":")[0] for h in header.decode().strip().split("\t")]
    try:
        return pacsv.read_csv(
            io.BytesIO(body),
            read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(STAGE, dataset, f"unparseable ML-100K file: {exc}") from None


def read_ml100k(wheel: str | Path) -> tuple[pa.Table, pa.Table]:
    """(interactions, items) of ML-100K, conformed to the declared schemas.

    Items: title, year and genres (as ``tags``) from ``ml-100k.item``; interactions: user, item,
    rating 1-5 and unix timestamp from ``ml-100k.inter``. ``label`` is left null: what counts as
    positive is a ranking-stage decision, not an ingestion one.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            inter_raw = zf.read(ML100K_PREFIX + ".inter")
            item_raw = zf.read(ML100K_PREFIX + ".item")
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(STAGE, "ml100k", f"{wheel} is not a recbole wheel carrying ML-100K: {exc}") from None

    inter = _read_atomic_file(inter_raw, "interactions")
    interactions = pa.table({
        "user_id": pc.cast(inter["user_id"], pa.int64()),
        "item_id": pc.cast(inter["item_id"], pa.int64()),
        "ts": pc.cast(pc.cast(inter["timestamp"], pa.float64()), pa.int64()),
        "rating": pc.cast(inter["rating"], pa.float32()),
        "label": pa.nulls(inter.num_rows, pa.int8()),
    }, schema=INTERACTIONS.schema)

    item = _read_atomic_file(item_raw, "items")
    # Two rows carry junk years ('unkonwn', 'V'): those become null.
    raw_year = pc.utf8_trim_whitespace(item["release_year"])
    year = pc.cast(pc.if_else(pc.match_substring_regex(raw_year, r"^\d{4}$"), raw_year, None), pa.int32())
    genres = pc.split_pattern(pc.utf8_trim_whitespace(item["class"]), " ")
    tags = pa.array([[g for g in gs if g and g != "unknown"] for gs in genres.to_pylist()],
                    type=pa.list_(pa.string()))
    items = pa.table({
        "item_id": pc.cast(item["item_id"], pa.int64()),
        "title": pc.utf8_trim_whitespace(item["movie_title"]),
        "year": year,
        "tags": tags,
        "description": pa.nulls(item.num_rows, pa.string()),
    }, schema=ITEMS.schema)
    return interactions, items


# ---------------------------------------------------------------- a user's own files
def _open_batches(path: Path, dataset: str, delimiter: str) -> Iterator[pa.RecordBatch]:
    """Raw record batches from a Parquet file/folder or a CSV file, without conversion."""
    if not path.exists():
        raise DataError(STAGE, dataset, f"input file not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(STAGE, dataset, f"input file is empty: {path}")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in PARQUET_SUFFIXES:
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise DataError(STAGE, dataset, f"no *.parquet files in folder {path}")
        for f in files:
            try:
                pf = pq.ParquetFile(f)
                yield from pf.iter_batches(batch_size=1_000_000)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(STAGE, dataset, f"unreadable Parquet file {f}: {exc}") from None
    elif suffix in CSV_SUFFIXES:
        delim = "\t" if suffix == ".tsv" else delimiter
        try:
            # Everything as text first, so that a bad value yields our message, not Arrow's guess.
            reader = pacsv.open_csv(path, parse_options=pacsv.ParseOptions(delimiter=delim),
                                    read_options=pacsv.ReadOptions(block_size=64 << 20),
                                    convert_options=pacsv.ConvertOptions(
                                        column_types=_all_text_types(path, delim)))
            yield from reader
        except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
            raise DataError(STAGE, dataset, f"unreadable CSV file {path} (CSV must be UTF-8): "
                                            f"{exc}") from None
    else:
        raise DataError(STAGE, dataset, f"unsupported file type {suffix!r} for {path}; "
                                        f"use .parquet, .csv or .tsv")


def _all_text_types(path: Path, delim: str) -> dict[str, pa.DataType]:
    with open(path, "rb") as fh:
        header = fh.readline().rstrip(b"\r\n").decode("utf-8-sig")
    return {name.strip('"'): pa.string() for name in header.split(delim)}


_INT_TEXT = r"^\s*[-+]?\d+\s*$"


def _blank_to_null(col: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(pc.utf8_trim_whitespace(col), ""), None, col)


def _text_to_int(col: pa.Array, target: pa.DataType) -> pa.Array:
    """Integers written as text: exact for any int64 (never via float64, which rounds above
    2**53); whole-valued decimals such as '12.0' are accepted if they round-trip exactly."""
    col = _blank_to_null(col)
    if pc.all(pc.or_kleene(pc.is_null(col), pc.match_substring_regex(col, _INT_TEXT))).as_py():
        return pc.cast(pc.utf8_trim_whitespace(col), target, safe=True)
    as_float = pc.cast(col, pa.float64())
    out = pc.cast(as_float, target, safe=True)  # refuses 1.5 -> 1
    if not pc.all(pc.or_kleene(pc.is_null(out), pc.less_equal(pc.abs(as_float), 2.0 ** 53))).as_py():
        raise pa.ArrowInvalid("integer written in decimal notation beyond 2**53 cannot be read exactly")
    return out


def _bad_values(col: pa.Array, target: pa.DataType, n: int = 5) -> list:
    """The first few values that cannot be read as ``target`` (for the error message): found by
    bisection with the very cast that failed, so an int64 overflow or a NaN timestamp shows the
    offending value, not the first values of the column."""
    found: list = []

    def scan(part: pa.Array) -> None:
        if len(found) >= n or len(part) == 0:
            return
        try:
            _cast(part, target)
            return
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        if len(part) == 1:
            found.append(part[0].as_py())
            return
        mid = len(part) // 2
        scan(part.slice(0, mid))
        scan(part.slice(mid))

    scan(col)
    return found


def _cast(col: pa.Array, target: pa.DataType) -> pa.Array:
    if pa.types.is_timestamp(col.type) and pa.types.is_integer(target):
        # A typed timestamp says its unit: store unix seconds whatever the unit was.
        return pc.cast(pc.cast(col, pa.timestamp("s", tz=col.type.tz), safe=False), target)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        if pa.types.is_list(target):  # tags as "a|b|c" in text files
            return pc.split_pattern(col, "|")
        if pa.types.is_integer(target):
            return _text_to_int(col, target)
        if pa.types.is_floating(target):
            col = _blank_to_null(col)
    return pc.cast(col, target, safe=True)   # refuses 1.5 -> 1 and out-of-range values


def _cast_column(col: pa.Array, target: pa.DataType, dataset: str, name: str) -> pa.Array:
    if col.type == target:
        return col
    try:
        return _cast(col, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(STAGE, dataset, f"column {name!r} has type {col.type} and cannot be read "
                                        f"as {target} ({exc}); offending values: "
                                        f"{_bad_values(col, target)}") from None


def conform_batch(batch: pa.RecordBatch | pa.Table, schema: DatasetSchema) -> pa.RecordBatch:
    """Select, cast and complete the columns of ``batch`` to the declared ``schema``.

    Missing optional columns become nulls; extra columns are dropped. Nulls in non-nullable
    columns are kept (as a nullable array) for the gate to report with the offending rows.
    """
    names = batch.schema.names
    dup = sorted({n for n in names if names.count(n) > 1 and n in schema.columns})
    if dup:
        raise DataError(STAGE, schema.name, f"column(s) {dup} appear more than once")
    missing = [c for c in schema.required if c not in names]
    if missing:
        raise DataError(STAGE, schema.name, f"missing required column(s) {missing}; "
                                            f"found {names}; required {list(schema.required)}")
    if schema is INTERACTIONS and "rating" not in names and "label" not in names:
        raise DataError(STAGE, schema.name, "needs a 'rating' or a 'label' column; found "
                                            f"{names}")
    arrays = []
    for f in schema.schema:
        if f.name in names:
            col = batch.column(names.index(f.name))
            if isinstance(col, pa.ChunkedArray):
                col = col.combine_chunks()
            arrays.append(_cast_column(col, f.type, schema.name, f.name))
        else:
            arrays.append(pa.nulls(batch.num_rows, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema.schema)


def iter_conformed(path: str | Path, schema: DatasetSchema, delimiter: str = ",") -> Iterator[pa.RecordBatch]:
    """Conformed batches of one input file or Parquet folder; raises if it holds no rows."""
    rows = 0
    for batch in _open_batches(Path(path), schema.name, delimiter):
        rows += batch.num_rows
        yield conform_batch(batch, schema)
    if rows == 0:
        raise DataError(STAGE, schema.name, f"{path} holds no rows")




# ---------------------------------------------------------------- one entry point per configured source
BatchesFn = Callable[[], Iterator[pa.RecordBatch]]


def _in_batches(table: pa.Table) -> BatchesFn:
    return lambda: iter(table.to_batches(max_chunksize=1_000_000))


def _input_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path]


def resolve_source(cfg: IngestConfig, home: str | Path | None = None,
                   snapshot_id: str | None = CURRENT_AT_READ) -> tuple[str, dict[str, BatchesFn]]:
    """(fingerprint of the source content, {dataset: batches function}) for the configured source;
    reading a dataset logs its progress (rows read, rate). ``home``: the QARM_HOME whose published
    snapshot the ``published`` source reads: ``snapshot_id`` (a refresh's parent), else the one
    CURRENT names (``CURRENT_AT_READ``).

    The fingerprint changes whenever the input data would: it keys the ingest stage's rerun cache.
    """
    fp, fns = _published_source(home, snapshot_id) if cfg.source == "published" else _resolve_source(cfg)
    if cfg.truncate_description_chars is not None:
        from qarm_core.hashing import stable_hash

        fp = stable_hash([fp, "truncate_description_chars", cfg.truncate_description_chars])
        fns = {**fns, "items": _truncating(fns["items"], cfg.truncate_description_chars)}
    return fp, {name: _counting(name, fn) for name, fn in fns.items()}


def _truncating(fn: BatchesFn, n: int) -> BatchesFn:
    """Item batches with ``description`` cut to ``n`` characters."""
    def gen() -> Iterator[pa.RecordBatch]:
        for b in fn():
            i = b.schema.get_field_index("description")
            if i >= 0:
                b = b.set_column(i, "description", pc.utf8_slice_codeunits(b.column(i), 0, n))
            yield b
    return gen


def _counting(name: str, fn: BatchesFn) -> BatchesFn:
    from qarm_core.progress import counted

    return lambda: counted(fn(), STAGE, f"reading {name}")


def _published_source(home: str | Path | None, snapshot_id: str | None) -> tuple[str, dict[str, BatchesFn]]:
    """The interactions and items of snapshot ``snapshot_id`` under ``home`` (``CURRENT_AT_READ``: the
    one CURRENT names); their fingerprint is the datasets' content hashes. A DataError names what is
    missing."""
    from qarm_core.hashing import stable_hash
    from qarm_core.storage import Storage

    if home is None:
        raise ValueError("ingest.source 'published' needs the home to read from")
    snap = Storage(home).as_of(snapshot_id).base()
    if snap is None:
        raise DataError(STAGE, "interactions", f"ingest.source is 'published' but nothing is published under "
                                               f"{home}: run qarm ingest first")
    records = {}
    for schema in (INTERACTIONS, ITEMS):
        if schema.name not in snap.manifest.get("datasets", {}):
            raise DataError(STAGE, schema.name, f"ingest.source is 'published' but snapshot {snap.snapshot_id} "
                                                f"has no {schema.name}: run qarm ingest first")
        rec = snap.record(schema.name)
        if rec.schema_version != schema.version:
            raise DataError(STAGE, schema.name, f"snapshot {snap.snapshot_id} holds {schema.name} of schema "
                                                f"version {rec.schema_version}; this qarm reads version "
                                                f"{schema.version}: ingest the data again")
        records[schema.name] = rec
    fp = stable_hash({"source": "published", **{n: r.fingerprint for n, r in records.items()}})
    return fp, {n: (lambda r=r, schema=schema_for(n): iter_conformed(r.path, schema)) for n, r in records.items()}


def _resolve_source(cfg: IngestConfig) -> tuple[str, dict[str, BatchesFn]]:
    from qarm_core.hashing import stable_hash
    from qarm_core.storage import hash_files
    from qarm_core.synth import SynthSpec, iter_synthetic_interactions, iter_synthetic_items

    if cfg.source == "ml100k":
        wheel = fetch_recbole_wheel(cfg.ml100k.cache_dir, cfg.ml100k.recbole_version)
        fp = stable_hash({"source": "ml100k", "wheel": hash_files([wheel])})
        # Parsed lazily so that a cached ingest does not even open the wheel.
        cache: dict[str, tuple[pa.Table, pa.Table]] = {}

        def table(i: int) -> BatchesFn:
            def gen() -> Iterator[pa.RecordBatch]:
                if "t" not in cache:
                    cache["t"] = read_ml100k(wheel)
                return _in_batches(cache["t"][i])()
            return gen
        return fp, {"interactions": table(0), "items": table(1)}

    if cfg.source == "files":
        paths = {"interactions": Path(cfg.files.interactions), "items": Path(cfg.files.items)}
        for name, p in paths.items():
            if not p.exists():
                raise DataError(STAGE, name, f"input file not found: {p}")
        fp = stable_hash({"source": "files", "delimiter": cfg.files.csv_delimiter,
                          **{n: hash_files(_input_files(p)) for n, p in paths.items()}})
        return fp, {
            "interactions": lambda: iter_conformed(paths["interactions"], INTERACTIONS, cfg.files.csv_delimiter),
            "items": lambda: iter_conformed(paths["items"], ITEMS, cfg.files.csv_delimiter),
        }

    spec = SynthSpec(users=cfg.synth.users, items=cfg.synth.items, interactions=cfg.synth.interactions,
                     seed=cfg.synth.seed, zipf_exponent=cfg.synth.zipf_exponent)
    fp = stable_hash({"source": "synth", **cfg.synth.model_dump()})
    return fp, {"interactions": lambda: iter_synthetic_interactions(spec),
                "items": lambda: iter_synthetic_items(spec)}
