"""Data gates: Great Expectations suites on each DAG edge, plus keyed checks in DuckDB.

Row-level expectations (nulls, ranges, sets, lengths) run through Great Expectations on batches of
``gates.batch_rows`` rows, so a 100M-row log never becomes one DataFrame. Checks that need the whole
dataset (row count, key uniqueness, ids present in the catalog) run in DuckDB over the Parquet
files. Both report in the same ``Check`` form, named like GX expectations.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from qarm_core.base import DuckDBConfig, Strict
from qarm_core.duck import connect, parquet_source
from qarm_core.errors import GateError
from qarm_core.progress import Progress
from qarm_core.schemas import (
    CODES, EMBEDDINGS, INTERACTIONS, ITEMS, JUDGMENTS, PAIRS, QA, DatasetSchema, embeddings_schema, schema_for,
)
from qarm_core.storage import DatasetRecord


class RowBounds(Strict):
    min_rows: int = Field(1, ge=0)
    max_rows: int = Field(1_000_000_000, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "RowBounds":
        if self.min_rows > self.max_rows:
            raise ValueError(f"min_rows ({self.min_rows}) > max_rows ({self.max_rows})")
        return self


class InteractionGate(RowBounds):
    rating_min: float = 0.0
    rating_max: float = 5.0
    # Earliest and latest plausible event time (unix seconds); catches ms-vs-s unit mix-ups.
    ts_min: int = 0
    ts_max: int = 4_102_444_800  # 2100-01-01

    @model_validator(mode="after")
    def _ranges_ordered(self) -> "InteractionGate":
        if self.rating_min > self.rating_max:
            raise ValueError(f"rating_min ({self.rating_min}) > rating_max ({self.rating_max})")
        if self.ts_min > self.ts_max:
            raise ValueError(f"ts_min ({self.ts_min}) > ts_max ({self.ts_max})")
        return self


class ItemGate(RowBounds):
    max_title_chars: int = Field(1_000, ge=1)
    # A 10 MB description would reach every prompt and token budget of the item; longer ones fail
    # the gate (or set ingest.truncate_description_chars to cut them while reading).
    max_description_chars: int = Field(10_000, ge=1)


class QAGate(RowBounds):
    # A sanity bound, independent of the generator's own cut (qa.max_answer_chars).
    max_text_chars: int = Field(1_000, ge=1)


class EmbeddingsGate(RowBounds):
    norm_tolerance: float = Field(1e-3, gt=0.0)   # | ||v|| - 1 | allowed (vectors are L2-normalised)


class CodesGate(RowBounds):
    # Share of items whose raw (c1, c2, c3_raw) code, as quantised, is shared with another item: the
    # quantizer's own quality, before collision resolution moves items apart.
    max_raw_collision_rate: float = Field(0.25, ge=0.0, le=1.0)
    # Share of items still sharing (c1, c2, c3) after resolution (told apart only by a SID suffix).
    max_resolved_collision_rate: float = Field(0.05, ge=0.0, le=1.0)
    # Share of the items already in the published codes whose SID changed, on a daily run: one that
    # encodes with the published embedding model's codebook (warm start or frozen; not a new model's
    # fresh fit, nor `quantize.mode: refit`). A daily run's goal is <= 1%; more means the codebook
    # moved under the ranking model's feet. None: reported only.
    max_daily_churn: float | None = Field(0.05, ge=0.0, le=1.0)
    # The same bound for a daily run whose FSQ level was refitted (quantize.fsq_refit_drift): a refit
    # moves items between FSQ cells by design, so it has its own bound. None: reported only.
    max_fsq_refit_churn: float | None = Field(None, ge=0.0, le=1.0)
    # The bound on a new embedding model's run (the weekly retrain: its cells carried over and matched
    # to the old SIDs, or its vectors re-projected onto the published codebook's space): fail the
    # refresh, so the old model and codes stay published, rather than renumber more than this share
    # of the items. None: reported only (real ML-100K retrains moved 17-99.7% of the SIDs with the
    # cells carried over, 99.7% at the weekly budget of 800 steps; 32-95% re-projected: README
    # "Stable SIDs, measured", "Re-projecting a retrained model").
    max_retrain_churn: float | None = Field(None, ge=0.0, le=1.0)


class SplitGate(Strict):
    # Events the training and validation periods must hold (qarm_core.split.split_gate).
    min_train_events: int = Field(1, ge=1)
    min_valid_events: int = Field(1, ge=1)


class GatesConfig(Strict):
    interactions: InteractionGate = InteractionGate()
    split: SplitGate = SplitGate()
    items: ItemGate = ItemGate()
    pairs: RowBounds = RowBounds()
    judgments: RowBounds = RowBounds()
    qa: QAGate = QAGate()
    embeddings: EmbeddingsGate = EmbeddingsGate()
    codes: CodesGate = CodesGate()
    # Rows per batch handed to Great Expectations; keyed and table-level checks run in DuckDB.
    batch_rows: int = Field(2_000_000, ge=1)
    sample_rows: int = Field(5, ge=1)


@dataclass
class Check:
    expectation: str
    kwargs: dict
    success: bool
    unexpected_count: int = 0
    sample: list = field(default_factory=list)   # offending rows (dicts), at most gates.sample_rows
    observed: object = None
    engine: str = "great_expectations"


@dataclass
class GateResult:
    stage: str
    dataset: str
    rows: int
    checks: list[Check]

    @property
    def success(self) -> bool:
        return all(c.success for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.success]

    def to_dict(self) -> dict:
        return {"stage": self.stage, "dataset": self.dataset, "rows": self.rows,
                "success": self.success, "checks": [asdict(c) for c in self.checks]}

    def raise_if_failed(self) -> "GateResult":
        if not self.success:
            raise GateError(self.stage, self.dataset, [asdict(c) for c in self.failures])
        return self


# ----------------------------------------------------------------------------- suites
@dataclass(frozen=True)
class Suite:
    """What a gate checks on one dataset.

    ``row_expectations``: (GX expectation class name, kwargs) run per batch.
    ``sql_checks``: (name, kwargs, SQL selecting offending rows from ``data`` [and ``catalog``]).
    ``share_checks``: (name, kwargs, SQL selecting offending rows, max share of all rows): passes
    while the offending rows are at most that share (e.g. the SID collision rate).
    """

    schema: DatasetSchema
    row_expectations: list[tuple[str, dict]]
    sql_checks: list[tuple[str, dict, str]]
    bounds: tuple[int, int]
    # Float columns that must hold no NaN/inf. Checked in Arrow: GX treats NaN as null and skips
    # it, and DuckDB 2.0 prunes Parquet row groups by min/max statistics that leave NaN out, so a
    # SQL filter for NaN can miss it.
    finite_columns: tuple[str, ...] = ()
    # A fixed-size-list float column whose rows must be finite, non-null and of L2 norm within
    # ``unit_norm_tol`` of 1 (None: norm not checked). Checked in Arrow/numpy, batch by batch.
    vector_column: str | None = None
    unit_norm_tol: float | None = None
    share_checks: list[tuple[str, dict, str, float]] = field(default_factory=list)


def _not_null(schema: DatasetSchema) -> list[tuple[str, dict]]:
    return [("ExpectColumnValuesToNotBeNull", {"column": c}) for c in schema.not_null]


def _unique_key(schema: DatasetSchema) -> tuple[str, dict, str]:
    cols = ", ".join(schema.key)
    return ("expect_compound_columns_to_be_unique", {"column_list": list(schema.key)},
            f"SELECT * FROM data WHERE ({cols}) IN "
            f"(SELECT ({cols}) FROM data GROUP BY ALL HAVING count(*) > 1) ORDER BY {cols}")


def _in_catalog(column: str) -> tuple[str, dict, str]:
    return ("expect_item_ids_to_be_in_catalog", {"column": column, "catalog": "items"},
            f"SELECT * FROM data WHERE {column} IS NOT NULL AND {column} NOT IN "
            f"(SELECT item_id FROM catalog WHERE item_id IS NOT NULL)")


def interactions_suite(cfg: GatesConfig, refs: frozenset[str], expect: dict) -> Suite:
    g = cfg.interactions
    sql = [
        _unique_key(INTERACTIONS),
        ("expect_rating_or_label_to_be_present", {"columns": ["rating", "label"]},
         "SELECT * FROM data WHERE rating IS NULL AND label IS NULL"),
    ]
    if "catalog" in refs:
        sql.append(_in_catalog("item_id"))
    rows = _not_null(INTERACTIONS) + [
        ("ExpectColumnValuesToBeBetween", {"column": "rating", "min_value": g.rating_min,
                                           "max_value": g.rating_max}),
        ("ExpectColumnValuesToBeInSet", {"column": "label", "value_set": [0, 1]}),
        ("ExpectColumnValuesToBeBetween", {"column": "ts", "min_value": g.ts_min, "max_value": g.ts_max}),
    ]
    return Suite(INTERACTIONS, rows, sql, (g.min_rows, g.max_rows), finite_columns=("rating",))


def items_suite(cfg: GatesConfig, refs: frozenset[str] = frozenset(), expect: dict | None = None) -> Suite:
    g = cfg.items
    rows = _not_null(ITEMS) + [
        ("ExpectColumnValueLengthsToBeBetween", {"column": "title", "min_value": 1,
                                                 "max_value": g.max_title_chars}),
        ("ExpectColumnValuesToMatchRegex", {"column": "title", "regex": r"\S"}),
        ("ExpectColumnValueLengthsToBeBetween", {"column": "description", "min_value": 0,
                                                 "max_value": g.max_description_chars}),
        ("ExpectColumnValuesToBeBetween", {"column": "year", "min_value": 1800, "max_value": 2100}),
    ]
    return Suite(ITEMS, rows, [_unique_key(ITEMS)], (g.min_rows, g.max_rows))


PAIR_SOURCES = ["swing", "u2i"]


def pairs_suite(cfg: GatesConfig, refs: frozenset[str], expect: dict) -> Suite:
    sql = [_unique_key(PAIRS),
           ("expect_no_self_pairs", {"column_A": "src_item", "column_B": "dst_item"},
            "SELECT * FROM data WHERE src_item = dst_item")]
    if "catalog" in refs:
        sql += [_in_catalog("src_item"), _in_catalog("dst_item")]
    rows = _not_null(PAIRS) + [("ExpectColumnValuesToBeInSet", {"column": "source", "value_set": PAIR_SOURCES})]
    return Suite(PAIRS, rows, sql, (cfg.pairs.min_rows, cfg.pairs.max_rows), finite_columns=("score",))


_PAIR = "src_item, dst_item, source"


def judgments_suite(cfg: GatesConfig, refs: frozenset[str], expect: dict) -> Suite:
    """One judgment per mined pair (no more, no fewer), each with a finite score and a verdict."""
    sql = [("expect_one_judgment_per_pair", {"column_list": _PAIR.split(", ")},
            f"SELECT * FROM data WHERE ({_PAIR}) IN (SELECT ({_PAIR}) FROM data GROUP BY ALL "
            f"HAVING count(*) > 1) ORDER BY {_PAIR}")]
    if "pairs" in refs:
        sql += [("expect_every_pair_to_be_judged", {"reference": "pairs"},
                 f"SELECT {_PAIR} FROM pairs EXCEPT SELECT {_PAIR} FROM data ORDER BY {_PAIR}"),
                ("expect_judgments_to_be_of_mined_pairs", {"reference": "pairs"},
                 f"SELECT * FROM data WHERE ({_PAIR}) NOT IN (SELECT ({_PAIR}) FROM pairs) ORDER BY {_PAIR}")]
    if "catalog" in refs:
        sql += [_in_catalog("src_item"), _in_catalog("dst_item")]
    rows = _not_null(JUDGMENTS) + [
        ("ExpectColumnValuesToBeInSet", {"column": "source", "value_set": PAIR_SOURCES})]
    return Suite(JUDGMENTS, rows, sql, (cfg.judgments.min_rows, cfg.judgments.max_rows),
                 finite_columns=("score",))


def qa_suite(cfg: GatesConfig, refs: frozenset[str], expect: dict) -> Suite:
    """Non-empty, bounded questions and answers, one row per (item, question index)."""
    g = cfg.qa
    sql = [("expect_compound_columns_to_be_unique", {"column_list": ["item_id", "qa_index"]},
            "SELECT * FROM data WHERE (item_id, qa_index) IN (SELECT (item_id, qa_index) FROM data "
            "GROUP BY ALL HAVING count(*) > 1) ORDER BY item_id, qa_index")]
    if "catalog" in refs:
        sql.append(_in_catalog("item_id"))
    rows = _not_null(QA) + [
        ("ExpectColumnValuesToBeBetween", {"column": "qa_index", "min_value": 0}),
        *[(cls, {"column": c, **kw}) for c in ("question", "answer") for cls, kw in (
            ("ExpectColumnValueLengthsToBeBetween", {"min_value": 1, "max_value": g.max_text_chars}),
            ("ExpectColumnValuesToMatchRegex", {"regex": r"\S"}))],
    ]
    return Suite(QA, rows, sql, (g.min_rows, g.max_rows))


def embeddings_suite(cfg: GatesConfig, refs: frozenset[str], expect: dict) -> Suite:
    """Exactly one finite, unit-norm vector per catalog item; the width (``expect["dim"]``) is
    checked by the schema."""
    sql = [_unique_key(EMBEDDINGS)]
    if "catalog" in refs:
        sql += [_in_catalog("item_id"),
                ("expect_every_catalog_item_to_be_embedded", {"reference": "items"},
                 "SELECT item_id FROM catalog EXCEPT SELECT item_id FROM data ORDER BY item_id")]
    rows = [("ExpectColumnValuesToNotBeNull", {"column": c}) for c in ("item_id", "model_version")]
    return Suite(EMBEDDINGS, rows, sql, (cfg.embeddings.min_rows, cfg.embeddings.max_rows),
                 vector_column="vector", unit_norm_tol=cfg.embeddings.norm_tolerance)


def codes_suite(cfg: GatesConfig, refs: frozenset[str], expect: dict) -> Suite:
    """One SID per catalog item, codes in range (``expect["code_sizes"]``: the (K1, K2, FSQ space)
    of the quantizer), SIDs unique, raw (c1, c2, c3_raw) collisions at most
    ``gates.codes.max_raw_collision_rate`` and (c1, c2, c3) shared after resolution by at most
    ``max_resolved_collision_rate``."""
    g = cfg.codes
    sizes = expect.get("code_sizes") or (None, None, None)
    sql = [_unique_key(CODES),
           ("expect_column_values_to_be_unique", {"column": "sid"},
            "SELECT * FROM data WHERE sid IN (SELECT sid FROM data GROUP BY sid HAVING count(*) > 1) "
            "ORDER BY sid, item_id")]
    if "catalog" in refs:
        sql += [_in_catalog("item_id"),
                ("expect_every_catalog_item_to_have_a_sid", {"reference": "items"},
                 "SELECT item_id FROM catalog EXCEPT SELECT item_id FROM data ORDER BY item_id")]
    rows = _not_null(CODES) + [
        ("ExpectColumnValuesToBeBetween", {"column": c, "min_value": 0, "max_value": hi - 1})
        for c, hi in zip(("c1", "c2", "c3"), sizes) if hi is not None]
    shares = [("expect_raw_collision_rate_to_be_at_most", {"max_rate": g.max_raw_collision_rate},
               "SELECT * FROM data WHERE (c1, c2, c3_raw) IN (SELECT (c1, c2, c3_raw) FROM data GROUP BY ALL "
               "HAVING count(*) > 1) ORDER BY c1, c2, c3_raw, item_id", g.max_raw_collision_rate),
              ("expect_resolved_collision_rate_to_be_at_most", {"max_rate": g.max_resolved_collision_rate},
               "SELECT * FROM data WHERE (c1, c2, c3) IN (SELECT (c1, c2, c3) FROM data GROUP BY ALL "
               "HAVING count(*) > 1) ORDER BY c1, c2, c3, item_id", g.max_resolved_collision_rate)]
    return Suite(CODES, rows, sql, (g.min_rows, g.max_rows), share_checks=shares)


SUITES: dict[str, Callable[[GatesConfig, frozenset[str], dict], Suite]] = {
    "interactions": interactions_suite,
    "items": items_suite,
    "pairs": pairs_suite,
    "judgments": judgments_suite,
    "qa": qa_suite,
    "embeddings": embeddings_suite,
    "codes": codes_suite,
}


# ----------------------------------------------------------------------------- runner
def _schema_check(record: DatasetRecord, schema: DatasetSchema) -> Check:
    problems = []
    for f in record.files:
        found = pq.read_schema(Path(record.path) / f)
        if [(x.name, x.type) for x in found] != [(x.name, x.type) for x in schema.schema]:
            problems.append({"file": f, "found": [f"{x.name}:{x.type}" for x in found]})
    return Check("expect_schema_to_match", {"columns": [f"{x.name}:{x.type}" for x in schema.schema]},
                 success=not problems, unexpected_count=len(problems), sample=problems[:3], engine="arrow")


@functools.lru_cache(maxsize=1)
def _gx_validator():
    """One ephemeral GX context per process (creating one costs a temp folder and ~50 ms)."""
    import great_expectations as gx  # 3-4 s import: only when a gate runs
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (ctx.data_sources.add_pandas("qarm").add_dataframe_asset(name="batch")
                 .add_batch_definition_whole_dataframe("whole"))
    return gx, batch_def


MAX_SAMPLE_CHARS = 200


def _jsonable_rows(table: pa.Table | pa.RecordBatch) -> list[dict]:
    """Rows for error messages and MLflow: non-finite floats as text, long strings cut short."""
    rows = table.to_pylist()
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float) and not math.isfinite(v):
                r[k] = str(v)
            elif isinstance(v, str) and len(v) > MAX_SAMPLE_CHARS:
                r[k] = v[:MAX_SAMPLE_CHARS] + f"...[{len(v) - MAX_SAMPLE_CHARS} more chars]"
    return rows


def _run_row_expectations(suite: Suite, record: DatasetRecord, batch_rows: int,
                          sample_rows: int) -> list[Check]:
    gx, batch_def = _gx_validator()
    gx_suite = gx.ExpectationSuite(name=f"qarm-{suite.schema.name}")
    # GX does not return results in suite order: each expectation carries its index in ``meta``.
    for i, (cls_name, kwargs) in enumerate(suite.row_expectations):
        gx_suite.add_expectation(getattr(gx.expectations, cls_name)(**kwargs, meta={"qarm_index": i}))
    columns = sorted({kw["column"] for _, kw in suite.row_expectations})
    checks = [Check(_snake(cls_name), kwargs, True) for cls_name, kwargs in suite.row_expectations]
    finite = [Check("expect_column_values_to_be_finite", {"column": c}, True, engine="arrow")
              for c in suite.finite_columns]
    vec = []
    if suite.vector_column:
        vec.append(Check("expect_vectors_to_be_finite", {"column": suite.vector_column}, True, engine="arrow"))
        if suite.unit_norm_tol is not None:
            vec.append(Check("expect_vectors_to_have_unit_norm",
                             {"column": suite.vector_column, "tolerance": suite.unit_norm_tol}, True, engine="arrow"))
    prog = Progress(suite.schema.name, "gate: row checks", record.rows, "rows", quiet=True)
    for f in record.files:
        pf = pq.ParquetFile(Path(record.path) / f)
        for batch in pf.iter_batches(batch_size=batch_rows):
            prog.advance(batch.num_rows)
            if vec:
                _check_vectors(batch, suite, vec, sample_rows)
            for check in finite:
                col = batch.column(check.kwargs["column"])
                bad = pc.fill_null(pc.invert(pc.is_finite(col)), False)
                n_bad = pc.sum(bad).as_py() or 0
                if n_bad:
                    check.success = False
                    check.unexpected_count += n_bad
                    room = max(sample_rows - len(check.sample), 0)
                    check.sample.extend(_jsonable_rows(batch.filter(bad).slice(0, room)))
            df = batch.select(columns).to_pandas()
            res = batch_def.get_batch(batch_parameters={"dataframe": df}).validate(
                gx_suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": sample_rows})
            for r in res.results:
                check = checks[r.expectation_config.meta["qarm_index"]]
                if r.success:
                    continue
                if r.exception_info and r.exception_info.get("raised_exception"):
                    raise RuntimeError(f"gate expectation {check.expectation} crashed: "
                                       f"{r.exception_info.get('exception_message')}")
                check.success = False
                check.unexpected_count += int(r.result.get("unexpected_count") or 0)
                room = sample_rows - len(check.sample)
                idx = (r.result.get("partial_unexpected_index_list") or [])[:max(room, 0)]
                if idx:
                    check.sample.extend(_jsonable_rows(batch.take(pa.array(idx, pa.int64()))))
    prog.finish()
    return checks + finite + vec


def _check_vectors(batch: pa.RecordBatch, suite: Suite, checks: list[Check], sample_rows: int) -> None:
    """Row-wise finiteness (a null vector counts as bad) and L2 norm of ``suite.vector_column``."""
    import numpy as np

    col = batch.column(suite.vector_column)
    dim = col.type.list_size
    null = col.is_null().to_numpy(zero_copy_only=False)
    # Null rows still occupy ``dim`` slots in the child array; flatten() would drop them.
    x = col.values.slice(col.offset * dim, len(col) * dim).to_numpy(zero_copy_only=False)
    x = x.astype(np.float64, copy=False).reshape(len(col), dim)
    bad_finite = null | ~np.isfinite(x).all(axis=1)
    masks = [bad_finite]
    if len(checks) > 1:
        norm = np.sqrt(np.einsum("ij,ij->i", np.where(np.isfinite(x), x, 0.0), np.where(np.isfinite(x), x, 0.0)))
        masks.append(~bad_finite & (np.abs(norm - 1.0) > suite.unit_norm_tol))
    id_cols = [c for c in suite.schema.key if c in batch.schema.names]
    for check, bad in zip(checks, masks):
        n_bad = int(bad.sum())
        if n_bad:
            check.success = False
            check.unexpected_count += n_bad
            room = max(sample_rows - len(check.sample), 0)
            rows = batch.select(id_cols).filter(pa.array(bad)).slice(0, room).to_pylist()
            if check.expectation.endswith("unit_norm"):
                idx = np.flatnonzero(bad)[:room]
                for r, i in zip(rows, idx):
                    r["norm"] = round(float(norm[i]), 6)
            check.sample.extend(rows)


def _run_sql_checks(suite: Suite, record: DatasetRecord, refs: dict[str, DatasetRecord],
                    duck: DuckDBConfig, temp_dir: str | Path, sample_rows: int) -> tuple[int, list[Check]]:
    con = connect(duck, temp_dir)
    try:
        for view, rec in {"data": record, **refs}.items():
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM "
                        f"{parquet_source([str(Path(rec.path) / f) for f in rec.files])}")
        n_rows = con.sql("SELECT count(*) FROM data").fetchall()[0][0]
        lo, hi = suite.bounds
        checks = [Check("expect_table_row_count_to_be_between", {"min_value": lo, "max_value": hi},
                        success=lo <= n_rows <= hi, unexpected_count=0 if lo <= n_rows <= hi else 1,
                        observed=n_rows, engine="duckdb")]
        for name, kwargs, query in suite.sql_checks:
            count = con.sql(f"SELECT count(*) FROM ({query})").fetchall()[0][0]
            sample = _jsonable_rows(con.sql(f"{query} LIMIT {sample_rows}").to_arrow_table()) if count else []
            checks.append(Check(name, kwargs, success=count == 0, unexpected_count=int(count),
                                sample=sample, engine="duckdb"))
        for name, kwargs, query, max_share in suite.share_checks:
            count = con.sql(f"SELECT count(*) FROM ({query})").fetchall()[0][0]
            share = count / n_rows if n_rows else 0.0
            sample = _jsonable_rows(con.sql(f"{query} LIMIT {sample_rows}").to_arrow_table()) if count else []
            checks.append(Check(name, kwargs, success=share <= max_share, unexpected_count=int(count),
                                sample=[] if share <= max_share else sample, observed=share, engine="duckdb"))
        return n_rows, checks
    finally:
        con.close()


def run_gate(stage: str, record: DatasetRecord, cfg: GatesConfig, duck: DuckDBConfig,
             temp_dir: str | Path, catalog: DatasetRecord | None = None,
             pairs: DatasetRecord | None = None, expect: dict | None = None) -> GateResult:
    """Validate one dataset on a DAG edge; returns every check, failed or not (never raises on bad data).

    ``catalog``: the items dataset, for checks that ids exist in the catalog; ``pairs``: the mined
    pairs, for checks that the judgments cover them exactly; ``expect``: what other stages' configs
    fix about this dataset (embeddings: ``dim``; codes: ``code_sizes``).
    """
    expect = expect or {}
    refs = {name: rec for name, rec in (("catalog", catalog), ("pairs", pairs)) if rec is not None}
    suite = SUITES[record.dataset](cfg, frozenset(refs), expect)
    declared = embeddings_schema(expect["dim"]) if record.dataset == "embeddings" and "dim" in expect \
        else schema_for(record.dataset)
    schema_check = _schema_check(record, declared)
    if not schema_check.success:  # the other checks would only fail confusingly
        return GateResult(stage, record.dataset, record.rows, [schema_check])
    n_rows, sql_checks = _run_sql_checks(suite, record, refs, duck, temp_dir, cfg.sample_rows)
    row_checks = _run_row_expectations(suite, record, cfg.batch_rows, cfg.sample_rows) if n_rows else []
    return GateResult(stage, record.dataset, n_rows, [schema_check, *sql_checks, *row_checks])


def _snake(name: str) -> str:
    out = "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return out


def churn_gate(stage: str, metrics: dict[str, float], how: str, g: "CodesGate") -> GateResult:
    """The quantize stage's churn (dataset ``codes``) as a gate: on a daily run (``how`` is
    ``warm_start`` or ``frozen``: the published model's codebook, see ``quantize_stage``), the share
    of previously coded items whose SID changed must stay within ``g.max_daily_churn``, or within
    ``g.max_fsq_refit_churn`` when the run refitted its FSQ level; on a new embedding model's run
    guided by the previous codes (``how`` ends with ``CARRIED_OVER`` or ``REPROJECTED``: the
    retrain day), within ``g.max_retrain_churn``. Other runs (a first fit, an asked-for refit) pass
    with nothing to check: their churn is reported only."""
    from qarm_core.quantize.stage import NEW_MODEL_RUNS

    n = int(metrics.get("churn_items", 0))
    if "churn" not in metrics:
        return GateResult(stage, "codes", n, [])
    fsq_refit = metrics.get("fsq.refit", 0.0) > 0
    if how in ("warm_start", "frozen"):
        bound, run = (g.max_fsq_refit_churn, "fsq refit") if fsq_refit else (g.max_daily_churn, "daily")
    elif how.endswith(NEW_MODEL_RUNS):
        bound, run = g.max_retrain_churn, "new model"
    else:
        return GateResult(stage, "codes", n, [])
    if bound is None:
        return GateResult(stage, "codes", n, [])
    value = float(metrics["churn"])
    ok = value <= bound
    return GateResult(stage, "codes", n, [Check(
        "expect_sid_churn_to_be_at_most", {"max_churn": bound, "run": run},
        success=ok, unexpected_count=0 if ok else int(round(value * n)), observed=value, engine="qarm",
        sample=[] if ok else [{"churn": round(value, 4), "items_in_both": n}])])


def judge_quality_gate(stage: str, aucs: dict[str, float], min_auc: float | None, note: str | None = None) -> GateResult:
    """The judge's evaluation (dataset ``judge_eval``) as a gate: each ``auc.<set>`` of ``aucs``
    (the judge stage's report) must reach ``min_auc``.

    No bound (``min_auc`` None) passes; a bound with no evaluation (``note`` says why) fails, since
    the run could not show that the judge still carries signal.
    """
    n = int(aucs.get("eval.pairs", 0))
    if min_auc is None:
        return GateResult(stage, "judge_eval", n, [])
    sets = {k: v for k, v in aucs.items() if k.startswith("auc.")}
    if not sets:
        return GateResult(stage, "judge_eval", n, [Check(
            "expect_judge_auc_to_be_measured", {"min_auc": min_auc}, False, 1,
            sample=[{"reason": note or "no evaluation set"}], engine="qarm")])
    return GateResult(stage, "judge_eval", n, [
        Check("expect_judge_auc_to_be_at_least", {"eval_set": k.removeprefix("auc."), "min_auc": min_auc},
              success=v >= min_auc, unexpected_count=int(v < min_auc), observed=v, engine="qarm",
              sample=[] if v >= min_auc else [{"auc": round(v, 4)}])
        for k, v in sorted(sets.items())])
