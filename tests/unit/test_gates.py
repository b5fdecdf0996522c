import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qarm_core.gates import GatesConfig
from qarm_core.config import parse_config
from qarm_core.errors import GateError
from qarm_core.gates import judge_quality_gate, run_gate
from qarm_core.schemas import INTERACTIONS, ITEMS, JUDGMENTS, QA
from qarm_core.storage import DatasetRecord, write_parquet_dataset
from tests.support.data import DUCK

GATES = parse_config({"gates": {"interactions": {"min_rows": 1, "max_rows": 100, "rating_min": 1.0,
                                                  "rating_max": 5.0},
                                "items": {"min_rows": 1, "max_rows": 100, "max_title_chars": 20}}}).gates


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
    assert "\n" not in msg                        # one line: the CLI's one error line


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


def _judgments(folder, **over):
    cols = {"src_item": [1, 2, 1], "dst_item": [2, 3, 3], "source": ["swing", "swing", "u2i"],
            "model_id": ["m"] * 3, "prompt_version": ["v"] * 3, "score": [1.0, -0.5, 0.2],
            "keep": [True, False, True]}
    cols = {**cols, **over}
    cols.setdefault("text_hash", ["h"] * len(cols["src_item"]))
    return _write(folder, "judgments", JUDGMENTS, cols)


def test_judgments_gate_one_judgment_per_mined_pair(tmp_path):
    items = _items(tmp_path)
    pairs = _pairs(tmp_path / "p", src_item=[1, 2, 1], dst_item=[2, 3, 3], source=["swing", "swing", "u2i"])
    ok = run_gate("judge", _judgments(tmp_path / "ok"), GATES, DUCK, str(tmp_path / "t"), catalog=items, pairs=pairs)
    assert ok.success, ok.failures
    # one pair judged twice (by two models), one not judged, one judged that was never mined, a NaN score
    bad = _judgments(tmp_path / "bad", src_item=[1, 1, 3, 2], dst_item=[2, 2, 1, 3],
                     source=["swing", "swing", "swing", "swing"], model_id=["m", "m2", "m", "m"],
                     prompt_version=["v"] * 4, score=[1.0, 2.0, 0.1, float("nan")], keep=[True, True, False, None])
    r = run_gate("judge", bad, GATES, DUCK, str(tmp_path / "t"), catalog=items, pairs=pairs)
    failed = {(c.expectation, c.kwargs.get("column")): c.unexpected_count for c in r.failures}
    assert failed == {("expect_one_judgment_per_pair", None): 2,
                      ("expect_every_pair_to_be_judged", None): 1,      # (1, 3, u2i)
                      ("expect_judgments_to_be_of_mined_pairs", None): 1,  # (3, 1, swing)
                      ("expect_column_values_to_be_finite", "score"): 1,
                      ("expect_column_values_to_not_be_null", "score"): 1,   # GX counts NaN as null
                      ("expect_column_values_to_not_be_null", "keep"): 1}
    with pytest.raises(GateError, match=r"(?s)\[stage=judge, dataset=judgments\].*expect_every_pair_to_be_judged"):
        r.raise_if_failed()


def test_qa_gate(tmp_path):
    items = _items(tmp_path)
    cols = {"item_id": [1, 1, 2], "qa_index": [0, 1, 0], "question": ["q?", "q2?", "q3?"],
            "answer": ["a.", "b.", "c."], "model_id": ["m"] * 3, "prompt_version": ["v"] * 3, "text_hash": ["h"] * 3}
    assert run_gate("qa", _write(tmp_path, "qa_ok", QA, cols), GATES, DUCK, str(tmp_path / "t"), catalog=items).success
    bad = _write(tmp_path, "qa_bad", QA, {**cols, "item_id": [1, 1, 9], "qa_index": [0, 0, 0],
                                        "answer": ["a.", "   ", None]})
    r = run_gate("qa", bad, GATES, DUCK, str(tmp_path / "t"), catalog=items)
    failed = {(c.expectation, c.kwargs.get("column")): c.unexpected_count for c in r.failures}
    assert failed == {("expect_compound_columns_to_be_unique", None): 2,
                      ("expect_item_ids_to_be_in_catalog", "item_id"): 1,
                      ("expect_column_values_to_not_be_null", "answer"): 1,
                      ("expect_column_values_to_match_regex", "answer"): 1}


def test_judge_quality_gate():
    report = {"auc.cooc": 0.81, "auc.genre": 0.70, "eval.pairs": 600.0, "pairs": 10.0}
    assert judge_quality_gate("judge", report, None).success
    r = judge_quality_gate("judge", report, 0.75)
    assert [(c.kwargs["eval_set"], c.observed) for c in r.failures] == [("genre", 0.70)]
    with pytest.raises(GateError, match=r"(?s)\[stage=judge, dataset=judge_eval\].*expect_judge_auc_to_be_at_least"):
        r.raise_if_failed()
    unmeasured = judge_quality_gate("judge", {}, 0.75, note="the interactions carry no ratings")
    assert not unmeasured.success and "no ratings" in str(unmeasured.failures[0].sample)


def _embeddings(folder, vectors, ids=(1, 2, 3), dim=4):
    import numpy as np
    from qarm_core.schemas import embeddings_schema

    from qarm_core.quantize.io import embeddings_batch

    x = np.asarray(vectors, dtype=np.float32)
    return write_parquet_dataset(folder, iter([embeddings_batch(np.asarray(ids), x, "m")]), embeddings_schema(dim))


def test_embeddings_gate(tmp_path):
    items = _items(tmp_path)
    unit = [[1, 0, 0, 0], [0, 0.6, 0.8, 0], [0, 0, 0, 1]]
    ok = run_gate("embed", _embeddings(tmp_path / "ok", unit), GATES, DUCK, str(tmp_path / "t"),
                  catalog=items, expect={"dim": 4})
    assert ok.success, ok.failures
    bad = _embeddings(tmp_path / "bad", [[1, 0, 0, 0], [float("nan"), 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0]],
                      ids=(1, 2, 2, 9))
    r = run_gate("embed", bad, GATES, DUCK, str(tmp_path / "t"), catalog=items, expect={"dim": 4})
    failed = {c.expectation: (c.unexpected_count, c.sample) for c in r.failures}
    assert failed["expect_vectors_to_be_finite"] == (1, [{"item_id": 2}])
    assert failed["expect_vectors_to_have_unit_norm"] == (1, [{"item_id": 2, "norm": 2.0}])
    assert failed["expect_compound_columns_to_be_unique"][0] == 2
    assert failed["expect_item_ids_to_be_in_catalog"][0] == 1
    assert failed["expect_every_catalog_item_to_be_embedded"] == (1, [{"item_id": 3}])
    # another width than the model's is a schema failure, reported alone
    wide = run_gate("embed", _embeddings(tmp_path / "w", unit), GATES, DUCK, str(tmp_path / "t"),
                    catalog=items, expect={"dim": 8})
    assert [c.expectation for c in wide.failures] == ["expect_schema_to_match"]


def test_codes_gate(tmp_path):
    from qarm_core.schemas import CODES

    items = _items(tmp_path)
    # raw codes: items 1 and 2 collided (0-1-5) and resolution moved item 2 to c3 = 6
    cols = {"item_id": [1, 2, 3], "c1": [0, 0, 1], "c2": [1, 1, 0], "c3": [5, 6, 5],
            "sid": ["0-1-5", "0-1-6", "1-0-5"], "resolved": [False, True, False], "c3_raw": [5, 5, 5]}
    sizes = {"code_sizes": (2, 2, 8)}
    gates = parse_config({"gates": {"codes": {"max_raw_collision_rate": 0.7}}}).gates
    assert run_gate("quantize", _write(tmp_path, "codes_ok", CODES, cols), gates, DUCK, str(tmp_path / "t"),
                    catalog=items, expect=sizes).success
    # the same codes fail a tighter raw bound: the raw collision is measured on c3_raw, not on c3
    r = run_gate("quantize", _write(tmp_path, "codes_raw", CODES, cols), GATES, DUCK, str(tmp_path / "t"),
                 catalog=items, expect=sizes)
    [raw] = r.failures
    assert raw.expectation == "expect_raw_collision_rate_to_be_at_most" and raw.observed == pytest.approx(2 / 3)
    bad = _write(tmp_path, "codes_bad", CODES, {**cols, "c1": [0, 0, 2], "c3": [5, 5, 5], "sid": ["a", "a", "b"],
                                                "c3_raw": [5, 6, 7]})
    r = run_gate("quantize", bad, GATES, DUCK, str(tmp_path / "t"), catalog=items, expect=sizes)
    failed = {(c.expectation, c.kwargs.get("column")): c.unexpected_count for c in r.failures}
    assert failed == {("expect_column_values_to_be_unique", "sid"): 2,
                      ("expect_column_values_to_be_between", "c1"): 1,
                      ("expect_resolved_collision_rate_to_be_at_most", None): 2}
    [coll] = [c for c in r.failures if c.expectation.startswith("expect_resolved_collision")]
    assert coll.observed == pytest.approx(2 / 3)
    loose = parse_config({"gates": {"codes": {"max_resolved_collision_rate": 0.7}}}).gates
    r2 = run_gate("quantize", bad, loose, DUCK, str(tmp_path / "t"), catalog=items, expect=sizes)
    assert "expect_resolved_collision_rate_to_be_at_most" not in {c.expectation for c in r2.failures}


def test_churn_gate_bounds_daily_runs_only():
    from qarm_core.gates import CodesGate, churn_gate

    g = CodesGate(max_daily_churn=0.05, max_fsq_refit_churn=0.3)
    daily = {"churn": 0.02, "churn_items": 1000.0, "fsq.refit": 0.0}
    assert churn_gate("quantize", daily, "warm_start", g).success
    assert churn_gate("quantize", daily, "frozen", g).success
    moved = churn_gate("quantize", daily | {"churn": 0.2}, "warm_start", g)
    assert not moved.success and moved.failures[0].expectation == "expect_sid_churn_to_be_at_most"
    assert moved.failures[0].unexpected_count == 200
    # an FSQ refit has its own bound
    assert churn_gate("quantize", daily | {"churn": 0.2, "fsq.refit": 1.0}, "warm_start", g).success
    assert not churn_gate("quantize", daily | {"churn": 0.4, "fsq.refit": 1.0}, "warm_start", g).success
    # a new model's fit, an asked-for refit, a first fit: reported, not gated by default
    from qarm_core.quantize.stage import CARRIED_OVER, REPROJECTED

    retrain = f"refit: the published codebook was fitted on embeddings of model a; {CARRIED_OVER}"
    reprojected = f"refit: the published codebook was fitted on embeddings of model a; {REPROJECTED}"
    for how in ("refit", "refit: no published codebook", "refit: the published codebook was fitted on embeddings of model a",
                retrain, reprojected):
        assert churn_gate("quantize", daily | {"churn": 0.9}, how, g).checks == []
    # the retrain day's own bound, when set: only for a new model whose cells were carried over
    bounded = CodesGate(max_retrain_churn=0.2)
    assert churn_gate("quantize", daily | {"churn": 0.15}, retrain, bounded).success
    failed = churn_gate("quantize", daily | {"churn": 0.9}, retrain, bounded)
    assert not failed.success and failed.failures[0].kwargs["run"] == "new model"
    assert churn_gate("quantize", daily | {"churn": 0.15}, reprojected, bounded).success
    assert churn_gate("quantize", daily | {"churn": 0.9}, reprojected, bounded).failures[0].kwargs["run"] == "new model"
    assert churn_gate("quantize", daily | {"churn": 0.9}, "refit: no published codebook", bounded).checks == []
    assert churn_gate("quantize", {"fsq.refit": 0.0}, "warm_start", g).checks == []      # nothing published before
    assert churn_gate("quantize", daily | {"churn": 0.9}, "warm_start", CodesGate(max_daily_churn=None)).checks == []
