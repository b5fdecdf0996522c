import numpy as np
import pyarrow as pa
import pytest

from qarm_core.errors import DataError
from qarm_core.quantize import fsq as F
from qarm_core.quantize import kmeans as K
from qarm_core.quantize.metrics import churn, collision_metrics, hit_rates, level_usage
from qarm_core.quantize.quantizer import (QuantizerParams, assign_semantic_ids, load_codebook,
                                          quantize_embeddings, save_codebook, validate_embeddings)
from qarm_core.quantize.sid import resolve_collisions, sid_keys

P = QuantizerParams(levels=(16, 8), fsq_dims=3, fsq_levels=4, niter=10, hr_sample=10_000)


def _emb(n=3000, dim=24, seed=0, clusters=40):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((clusters, dim))
    x = c[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.arange(n, dtype=np.int64) * 7 + 1


def _q(x, ids, params=P, **kw):
    return quantize_embeddings(x, ids, params, **kw)


def test_same_seed_bitwise_identical():
    x, ids = _emb()
    _, t1, _ = _q(x, ids)
    _, t2, _ = _q(x, ids)
    assert t1.equals(t2)
    _, other, _ = _q(x, ids, QuantizerParams(**{**P.__dict__, "seed": 1}))
    assert not other.equals(t1)


def test_inplace_consumes_input_but_gives_the_same_codes():
    x, ids = _emb()
    _, t1, m1 = _q(x, ids)
    buf = x.copy()
    _, t2, m2 = _q(buf, ids, inplace=True)
    assert t1.equals(t2) and not np.array_equal(buf, x)      # buf now holds the level-2 residual
    assert m1["raw.hr@1"] == m2["raw.hr@1"]


def test_codes_in_range_sids_unique_and_metrics_consistent():
    x, ids = _emb()
    _, t, m = _q(x, ids)
    assert t.column_names == ["item_id", "c1", "c2", "c3", "sid", "resolved", "c3_raw"]
    # the stored raw code reproduces the raw collision rate; resolution only moves colliding items
    raw = collision_metrics(sid_keys(t["c1"].to_numpy(), t["c2"].to_numpy(), t["c3_raw"].to_numpy(), 8, 4 ** 3))
    assert raw["collision_rate"] == m["raw.collision_rate"] > 0
    moved = t["c3"].to_numpy() != t["c3_raw"].to_numpy()
    assert (moved <= t["resolved"].to_numpy()).all() and moved.any()
    c1, c2, c3 = (t[c].to_numpy() for c in ("c1", "c2", "c3"))
    assert c1.max() < 16 and c2.max() < 8 and c3.min() >= 0 and c3.max() < 4 ** 3
    assert len(set(t["sid"].to_pylist())) == len(x)            # resolution + suffix make SIDs unique
    assert m["resolved.collision_rate"] <= m["raw.collision_rate"]
    assert m["raw.collision_rate"] < m["rkmeans.collision_rate"]  # the FSQ level splits k-means cells
    assert m["level1.utilisation"] == 1.0 and 0 < m["level1.entropy"] <= 1
    assert m["level3.mse"] <= m["level2.mse"] <= m["level1.mse"]


def test_warm_start_churn_zero_on_identical_and_small_on_perturbed():
    x, ids = _emb()
    cb, codes, _ = _q(x, ids)
    warm, again, m = _q(x, ids, previous=cb, previous_codes=codes)
    assert all(np.array_equal(a, b) for a, b in zip(warm.centroids, cb.centroids))
    assert m["churn"] == 0.0 and again.equals(codes)
    rng = np.random.default_rng(5)
    xp = x + 0.01 * rng.standard_normal(x.shape).astype(np.float32)
    xp /= np.linalg.norm(xp, axis=1, keepdims=True)
    _, warm_codes, mp = _q(xp, ids, previous=cb, previous_codes=codes)
    _, cold, _ = _q(xp, ids, QuantizerParams(**{**P.__dict__, "seed": 3}))
    cold_churn = churn(ids, np.asarray(codes["sid"].to_pylist()), ids, np.asarray(cold["sid"].to_pylist()))
    assert 0 < mp["churn"] < 0.25 and mp["churn"] < cold_churn["churn"]
    assert len(set(warm_codes["sid"].to_pylist())) == len(xp)   # carried-over SIDs stay unique


def test_frozen_codebook_encodes_new_items():
    x, ids = _emb(n=2000)
    cb, old, _ = _q(x[:1500], ids[:1500])
    t, _ = assign_semantic_ids(x, ids, cb, previous_codes=old)
    assert np.array_equal(t["c1"].to_numpy()[:1500], old["c1"].to_numpy())
    assert t["sid"].to_pylist()[:1500] == old["sid"].to_pylist()


def test_save_load_roundtrip(tmp_path):
    x, ids = _emb(n=1000)
    cb, codes, _ = _q(x, ids)
    save_codebook(cb, tmp_path / "cb")
    assert not list((tmp_path / "cb").glob("*.pkl"))
    back = load_codebook(tmp_path / "cb")
    assert assign_semantic_ids(x, ids, back)[0].equals(assign_semantic_ids(x, ids, cb)[0])
    (tmp_path / "cb" / "codebook.json").write_text("{}")
    with pytest.raises(DataError, match="format"):
        load_codebook(tmp_path / "cb")


def test_collision_metrics_known_answers():
    m = collision_metrics(np.array([5, 5, 6, 7]))
    assert m == {"collision_rate": 0.5, "one_minus_unique": 0.25, "edge_num": 4 / 3, "max_items_per_sid": 2.0}
    assert collision_metrics(np.arange(10))["collision_rate"] == 0.0


def test_hit_rates_known_answers():
    # group A: item 0 is beaten by item 1 (longer vector along the same axis); group B: duplicates
    x = np.array([[1, 0], [2, 0], [0, 1], [0, 1], [1, 1]], np.float32)
    keys = np.array([0, 0, 1, 1, 2])
    hr = hit_rates(x, keys, ks=(1, 2))
    # ranks: item0 -> 2, item1 -> 1, items 2/3 -> 2 (ties count against), item4 -> 1
    assert hr == {"hr@1": 2 / 5, "hr@2": 1.0}


def test_level_usage_and_churn():
    u = level_usage(np.array([0, 0, 1, 1]), 4)
    assert u["utilisation"] == 0.5 and u["entropy"] == pytest.approx(np.log(2) / np.log(4))
    c = churn(np.array([1, 2, 3]), np.array(["a", "b", "c"]), np.array([2, 3, 4]), np.array(["b", "x", "y"]))
    assert c == {"churn": 0.5, "churn_items": 2.0}


def test_resolve_moves_then_suffixes():
    keys = np.array([10, 10, 10, 20])
    c3 = np.array([0, 0, 0, 0])
    alt = np.array([[1, 2], [1, 2], [1, -1], [9, 9]])
    # 11 (c3=1) free: item 1 takes it; item 2's options 11 (now taken), none -> suffix
    new_c3, suffix, resolved = resolve_collisions(keys, np.array([0.0, 1.0, 2.0, 0.0]), alt, c3, 100)
    assert new_c3.tolist() == [0, 1, 0, 0] and suffix.tolist() == [0, 0, 1, 0]
    assert resolved.tolist() == [False, True, True, False]


def test_fsq_bins_are_equal_frequency_and_pack_roundtrips():
    rng = np.random.default_rng(0)
    r = rng.standard_normal((8000, 10)).astype(np.float32) * np.arange(1, 11)
    f = F.fit_fsq(r, 3, 4)
    d = F.digits_of(f, F.project(f, r))
    for j in range(3):
        assert np.allclose(np.bincount(d[:, j], minlength=4), 2000, atol=2)
    assert np.array_equal(F.unpack(F.pack(d, 4), 4, 3), d)
    assert np.abs(f.components @ f.components.T - np.eye(3)).max() < 1e-5


def test_fsq_digits_pack_and_mse_kernels_equal_numpy():
    """The compiled bins equal numpy's searchsorted (values on a boundary, tied boundaries, NaN,
    -inf/inf), Horner packing equals the weighted sum, and the cell-mean MSE equals a float64
    numpy reference (rows in several chunks)."""
    rng = np.random.default_rng(5)
    bounds = np.array([[-1.0, 0.0, 0.0, 2.0], [-3.0, -2.0, 1.0, 5.0]], np.float32)
    f = F.FSQCodebook(np.zeros(6, np.float32), np.eye(2, 6, dtype=np.float32), bounds, np.zeros((2, 5), np.float32))
    z = rng.choice(np.array([-1.0, 0.0, 2.0, -2.0, 5.0, 0.5, np.nan, -np.inf, np.inf], np.float32), (500, 2))
    z = np.concatenate([z, rng.standard_normal((500, 2)).astype(np.float32) * 3])
    want = np.stack([np.searchsorted(bounds[j], z[:, j], side="right") for j in range(2)], 1)
    assert np.array_equal(F.digits_of(f, z), want)
    with pytest.raises(ValueError, match="for an FSQ level of 2 dims"):
        F.digits_of(f, z[:, :1])
    d = rng.integers(0, 7, (300, 5)).astype(np.int32)
    assert np.array_equal(F.pack(d, 7), d.astype(np.int64) @ 7 ** np.arange(5, dtype=np.int64))
    r = rng.standard_normal((F.CHUNK + 1001, 19)).astype(np.float32)
    book = F.fit_fsq(r, 2, 3)
    dig = F.digits_of(book, F.project(book, r))
    ref = ((r.astype(np.float64) - book.cell_means[F.pack(dig, 3)].astype(np.float64)) ** 2).sum(1).mean()
    assert F.reconstruction_mse(book, r, dig) == pytest.approx(ref, rel=1e-12)
    # the fullest bin from the cell counts' marginals equals a bincount per coordinate
    skew = np.concatenate([dig, np.zeros((len(dig) // 2, 2), np.int32)])
    want = max(np.bincount(skew[:, j], minlength=3).max() for j in range(2)) / len(skew)
    assert F.fullest_bin_share(book, skew) == want and want > 0.4


def test_fsq_decodes_to_cell_means_and_the_sigmoid_form_is_its_rounding():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((12, 10)).astype(np.float32) * 2
    r = centres[rng.integers(0, 12, 6000)] + 0.3 * rng.standard_normal((6000, 10)).astype(np.float32)
    quantile = F.fit_fsq(r, 3, 2)
    d = F.digits_of(quantile, F.project(quantile, r))
    # the cell-mean table decodes better than the bin centres through the components
    from dataclasses import replace
    assert F.reconstruction_mse(quantile, r, d) < F.reconstruction_mse(replace(quantile, cell_means=None), r, d)
    code = F.pack(d, 2)
    assert np.allclose(F.decode(quantile, d)[code == code[0]][0], r[code == code[0]].mean(0), atol=1e-4)
    # the paper's form: digits are round((L - 1) * sigmoid((r - mean) @ W)) for the learned W
    sig = F.fit_fsq_sigmoid(r, 3, 3, steps=150)
    u = (r - sig.mean) @ sig.components.T
    assert np.array_equal(F.digits_of(sig, F.project(sig, r)), np.round(2 / (1 + np.exp(-u))).astype(np.int32))
    # ... and its codes spread over the cells: no cell holds much more than its share
    counts = np.bincount(F.pack(F.digits_of(sig, u.astype(np.float32)), 3), minlength=27)
    assert (counts > 0).sum() >= 20 and counts.max() < 0.2 * len(r)


def test_sigmoid_form_through_the_quantizer_and_codebook_files(tmp_path):
    x, ids = _emb(n=1000)
    params = QuantizerParams(**{**P.__dict__, "fsq_form": "sigmoid"})
    cb, codes, m = _q(x, ids, params)
    assert cb.fsq.cell_means.shape == (4 ** 3, 24) and m["raw.collision_rate"] < m["rkmeans.collision_rate"]
    save_codebook(cb, tmp_path / "cb")
    back = load_codebook(tmp_path / "cb")
    assert np.array_equal(back.fsq.cell_means, cb.fsq.cell_means) and back.params.fsq_form == "sigmoid"
    assert assign_semantic_ids(x, ids, back)[0].equals(assign_semantic_ids(x, ids, cb)[0])


@pytest.mark.parametrize("mutate,match", [
    (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), "NaN/inf"),
    (lambda x: x[:0], "no embeddings"),
    (lambda x: x[:, :5], "dim 5 != codebook dim 24"),
    (lambda x: x[:10], "fewer than K=16"),
    (lambda x: np.where(np.arange(len(x))[:, None] % 10 == 3, 0.0, x), "10 of 100 embeddings are all zeros"),
    (lambda x: np.zeros_like(x), "100 of 100 embeddings are all zeros"),
])
def test_bad_embeddings_rejected(mutate, match):
    x, ids = _emb(n=100)
    bad = mutate(x)
    with pytest.raises(DataError, match=r"\[stage=quantize, dataset=embeddings\].*" + match.replace("(", r"\(")):
        validate_embeddings(bad, ids[:len(bad)], dim=24, min_items=16)


def test_embeddings_with_extreme_but_valid_values_pass_and_bad_rows_are_named():
    """The validation flags rows by their squared norm first: a finite value whose square overflows
    float32, or tiny values whose squares underflow to 0, must not be reported as NaN/inf or zeros."""
    x, ids = _emb(n=100)
    x[3, 0], x[7] = 1e30, 1e-30
    assert validate_embeddings(x, ids, dim=24, min_items=16) is not None
    x[9, 4], x[11, 1] = np.inf, -np.inf
    with pytest.raises(DataError, match=r"2 embeddings hold NaN/inf, e.g. item ids \[64, 78\]"):
        validate_embeddings(x, ids, dim=24, min_items=16)


def test_threaded_gather_and_cell_priority_equal_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50_000, 100)).astype(np.float32)
    rows = np.sort(rng.choice(50_000, 45_000, replace=False))       # 4.5M values: the kernel's path
    assert np.array_equal(K.take_rows(x, rows), x[rows])
    assert np.array_equal(K.take_rows(x, rows[:10]), x[rows[:10]])  # small: numpy's
    for f in (1, 3, 7):                                  # below 8 terms numpy sums in order too
        z = (rng.standard_normal((1000, f)) * 10 ** rng.uniform(-3, 3, (1000, f))).astype(np.float32)
        digits = rng.integers(0, 4, (1000, f)).astype(np.int32)
        centers = rng.standard_normal((f, 4)).astype(np.float32)
        got = np.empty(1000, np.float32)
        K._k().cell_priority(z, digits, centers, got)
        dz = z - centers[np.arange(f)[None, :], digits]
        assert np.array_equal(got, (dz * dz).sum(1))


def test_row_sqnorms_on_threads_equal_one_einsum():
    x = np.random.default_rng(0).standard_normal((2 * 262_144 + 5, 8)).astype(np.float32)
    one = np.einsum("ij,ij->i", x, x)
    assert np.array_equal(K.row_sqnorms(x, n_threads=2), one)
    assert np.array_equal(K.row_sqnorms(x, n_threads=1), one)


def test_bad_params():
    with pytest.raises(ValueError, match="K >= 2"):
        QuantizerParams(levels=(1, 4))
    with pytest.raises(ValueError, match="int64"):
        QuantizerParams(levels=(8192, 8192), fsq_dims=13, fsq_levels=8)
    with pytest.raises(ValueError, match="exactly two"):
        QuantizerParams(levels=(4, 4, 4))


def test_embeddings_io(tmp_path):
    import pyarrow.parquet as pq

    from qarm_core.quantize.io import embeddings_batch, read_embeddings, synthetic_embeddings

    ids, x = next(synthetic_embeddings(100, 8, clusters=5))
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    pq.write_table(pa.Table.from_batches([embeddings_batch(ids, x, "v1")]), tmp_path / "e.parquet")
    got_ids, got = read_embeddings(tmp_path / "e.parquet")
    assert np.array_equal(got_ids, ids) and np.array_equal(got, x)
    pq.write_table(pa.table({"item_id": [1, 2], "vector": [[1.0, 2.0], [3.0, 4.0]]}), tmp_path / "l.parquet")
    assert read_embeddings(tmp_path / "l.parquet")[1].shape == (2, 2)
    pq.write_table(pa.table({"item_id": [1, 2], "vector": [[1.0, 2.0], [3.0]]}), tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match="different lengths"):
        read_embeddings(tmp_path / "ragged.parquet")
    pq.write_table(pa.table({"item_id": [1], "emb": [[1.0]]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match="needs columns item_id, vector"):
        read_embeddings(tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match="not found"):
        read_embeddings(tmp_path / "missing.parquet")
