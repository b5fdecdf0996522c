"""The quantizer's compiled kernels against plain references, determinism, warm start through the
Hungarian match, metrics on hand-made cases, and bad input through the public entry points."""

import numpy as np
import pyarrow as pa
import pytest

from qarm_core.errors import DataError
from qarm_core.quantize import fsq as F
from qarm_core.quantize import kmeans as K
from qarm_core.quantize.metrics import decode_hit_rates, hit_rates
from qarm_core.quantize.quantizer import QuantizerParams, assign_semantic_ids, quantize_embeddings
from qarm_core.quantize.sid import resolve_collisions, resolve_collisions_cells, sid_keys, sid_strings

P = QuantizerParams(levels=(16, 8), fsq_dims=3, fsq_levels=4, niter=10, hr_sample=10_000, decode_hr_sample=200)


def _emb(n=3000, dim=24, seed=0, clusters=40):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((clusters, dim))
    x = c[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.arange(n, dtype=np.int64) * 7 + 1


@pytest.mark.parametrize("seed,n_alt,kept_share,c1_stride,priority_kind", [
    (0, 32, 0.0, 1, "distance"), (1, 5, 0.3, 1, "distance"), (2, 3, 0.5, 1, "distance"),
    (3, 32, 0.2, 1_000_003, "distance"), (4, 32, 0.1, 1, "ties, signs, -0.0"), (5, 5, 0.3, 1, "float64")])
def test_resolve_cells_equals_reference(seed, n_alt, kept_share, c1_stride, priority_kind):
    """Row for row equal to the vectorised reference: dense cells (some with every FSQ code taken,
    whose movers go straight to suffixes), sparse ones, carried-over codes, and (c1_stride) a cell
    space far larger than the rows, which the kernel numbers compactly first; priorities with ties,
    both signs and signed zeros (one packed sort key) and float64 ones (two sorts)."""
    rng = np.random.default_rng(seed)
    n, f, L, k2 = 6000, 3, 4, 5
    r = rng.standard_normal((n, 10)).astype(np.float32)
    fsq = F.fit_fsq(r, f, L)
    z = F.project(fsq, r)
    d = F.digits_of(fsq, z)
    c3 = F.pack(d, L)
    c1, c2 = rng.integers(0, 6, n) * c1_stride, rng.integers(0, k2, n)
    c1[:1500] = 0                                                # cell (0, c2): every code held
    assert len(np.unique(c3[(c1 == 0) & (c2 == 0)])) == fsq.code_space
    keys = sid_keys(c1, c2, c3, k2, fsq.code_space)
    priority = ((z - fsq.centers[np.arange(f)[None, :], d]) ** 2).sum(1)
    if priority_kind == "ties, signs, -0.0":       # float32, sorted in one packed key
        priority = (np.round(priority * 4) / 4 - 0.5).astype(np.float32)
        priority[::7] = np.float32(-0.0)
        priority[3::7] = np.float32(0.0)
    elif priority_kind == "float64":               # two stable passes
        priority = priority.astype(np.float64) + 1e-12 * np.arange(n)
    kept = rng.random(n) < kept_share
    # a third of the kept rows take no part at all (carried over with a suffix: neither resolved
    # nor holding a code); with none kept, every row takes part (the kernel's no-gather path)
    idle = kept & (rng.random(n) < 1 / 3)
    held_out = kept & ~idle
    held_c3 = np.where(kept, rng.integers(0, fsq.code_space, n), c3)
    held = sid_keys(c1, c2, held_c3, k2, fsq.code_space)
    rest = np.flatnonzero(~kept)
    ref = resolve_collisions(keys[rest], priority[rest],
                             lambda rows: F.alternatives(fsq, z[rest][rows], d[rest][rows], n_alt),
                             c3[rest], fsq.code_space, occupied=held[held_out])
    got = resolve_collisions_cells(held, held_c3, fsq.code_space, priority, ~kept, held_out, z, d,
                                   fsq.boundaries, L, n_alt)
    for a, b in zip(ref, got):
        assert np.array_equal(a, b[rest])
    assert np.array_equal(got[0][kept], held_c3[kept]) and not got[2][kept].any()
    assert (idle.sum() > 100) == (kept_share > 0)
    assert ref[2].sum() > 100                                     # the case exercises moves and suffixes


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 11, 256])
def test_argmin_kernel_takes_the_lowest_index_on_ties(k):
    """The kernel sweeps four centroids at a time: every K (remainders too) must give numpy's
    argmin, first index on ties, and the same minimum and error."""
    rng = np.random.default_rng(k)
    gt = np.round(rng.standard_normal((k, 999)) * 2).astype(np.float32) / 2     # many exact ties
    cn = np.round(rng.random(k) * 2).astype(np.float32) / 2
    xn = rng.random(999).astype(np.float32) + 4
    labels, best = np.empty(999, np.int32), np.empty(999, np.float32)
    err = K._k().argmin_cols(gt, cn, xn, labels, best)
    full = gt + cn[:, None]
    assert (full == full.min(0)).sum(0).max() > 1                    # ties present
    assert np.array_equal(labels, full.argmin(0)) and np.array_equal(best, full.min(0))
    assert err == pytest.approx(np.maximum(xn.astype(np.float64) + full.min(0), 0).sum(), rel=1e-12)


def test_gemm_assignment_matches_brute_force_and_ignores_thread_count():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50_000, 32)).astype(np.float32)
    c = x[rng.choice(len(x), 64, replace=False)].copy()
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    d = (x64 ** 2).sum(1)[:, None] - 2.0 * x64 @ c64.T + (c64 ** 2).sum(1)[None, :]      # float64 reference
    labels, dist = K.assign(x, c)
    srt = np.sort(d, 1)
    clear = srt[:, 1] - srt[:, 0] > 1e-4                         # rows without a near tie
    assert clear.mean() > 0.99 and np.array_equal(labels[clear], d.argmin(1)[clear])
    assert np.allclose(dist, d[np.arange(len(x)), labels], rtol=1e-5, atol=1e-6)
    runs = []
    for t in (1, 2, 3):
        lab = np.empty(len(x), np.int32)
        runs.append((K._pass(x, c, lab, n_threads=t), lab))
    for (s, cnt, err), lab in runs[1:]:
        (s0, cnt0, err0), lab0 = runs[0]
        assert np.array_equal(lab, lab0) and np.array_equal(s, s0) and np.array_equal(cnt, cnt0) and err == err0
    assert np.allclose(runs[0][0][0], np.stack([x[labels == j].sum(0, dtype=np.float64) for j in range(64)]))


def test_sums_updated_by_the_rows_that_moved_equal_a_fresh_summation():
    """A pass told the previous labels and their sums adds only the rows that changed centroid:
    same labels and error as a full pass, counts exact, sums equal to float64 rounding; the same
    bits for any thread count. Assignment alone returns no sums."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40_000, 24)).astype(np.float32)
    c0 = x[rng.choice(len(x), 32, replace=False)].copy()
    lab0 = np.empty(len(x), np.int32)
    s0, cnt0, _ = K._pass(x, c0, lab0)
    c1 = (s0 / np.maximum(cnt0, 1)[:, None]).astype(np.float32)        # one Lloyd update
    full_lab = np.empty(len(x), np.int32)
    s_full, cnt_full, err_full = K._pass(x, c1, full_lab)
    moved = full_lab != lab0
    assert 0.01 < moved.mean() < 0.9                                   # some rows move, not all
    runs = []
    for t in (1, 2, 3):
        lab = np.empty(len(x), np.int32)
        runs.append((K._pass(x, c1, lab, n_threads=t, moved_from=(lab0, s0, cnt0)), lab))
    (s, cnt, err), lab = runs[0]
    assert np.array_equal(lab, full_lab) and err == err_full and np.array_equal(cnt, cnt_full)
    assert np.allclose(s, s_full, rtol=1e-12, atol=1e-9) and not np.array_equal(s, s0)
    for (s_t, cnt_t, err_t), lab_t in runs[1:]:
        assert np.array_equal(s_t, s) and np.array_equal(cnt_t, cnt) and err_t == err and np.array_equal(lab_t, lab)
    # the inputs are left as they were (lloyd keeps them for a rejected update)
    assert np.array_equal(s0, K._pass(x, c0, np.empty(len(x), np.int32))[0])
    lab_only = np.empty(len(x), np.int32)
    assert K._pass(x, c1, lab_only, with_sums=False)[:2] == (None, None) and np.array_equal(lab_only, full_lab)


def test_lloyd_fixed_point_and_hungarian_match():
    x, _ = _emb(n=4000)
    c, labels, mse, it, converged = K.lloyd(x, K.init_centroids(x, 16, 0), max_iter=100)
    assert converged
    again, labels2, mse2, it2, conv2 = K.lloyd(x, c, max_iter=100)
    assert it2 == 0 and conv2 and np.array_equal(again, c) and np.array_equal(labels2, labels) and mse2 == mse
    perm = np.random.default_rng(1).permutation(16)
    assert np.array_equal(K.match_to_previous(c[perm], c), np.argsort(perm))
    # warm start from a permuted codebook: the refit keeps the previous indices
    c_w, lab_w, _, rep = K.fit_level(x.copy(), 16, previous=c[perm], polish_iter=5)
    assert rep["warm_start"] and np.array_equal(c_w, c[perm]) and np.array_equal(perm[lab_w], labels)


def test_warm_start_keeps_permuted_codes():
    """Hungarian matching: a previous codebook whose level-1 indices were permuted (another fit
    that found the same clusters in another order) is kept index for index: churn 0."""
    x, ids = _emb()
    cb, codes, _ = quantize_embeddings(x, ids, P)
    perm = np.random.default_rng(3).permutation(16)
    inv = np.argsort(perm)
    prev = type(cb)([cb.centroids[0][perm], cb.centroids[1]], cb.fsq, cb.params, cb.fit_report)
    c1 = inv[codes["c1"].to_numpy()]
    sids = [f"{a}-{s.split('-', 1)[1]}" for a, s in zip(c1.tolist(), codes["sid"].to_pylist())]
    prev_codes = codes.set_column(1, "c1", pa.array(c1, pa.int32())).set_column(4, "sid", pa.array(sids))
    _, again, m = quantize_embeddings(x, ids, P, previous=prev, previous_codes=prev_codes)
    assert m["churn"] == 0.0 and np.array_equal(again["c1"].to_numpy(), c1)


def test_same_seed_bitwise_identical_at_scale():
    x, ids = _emb(n=40_000, dim=32, clusters=200)
    p = QuantizerParams(levels=(64, 32), fsq_dims=4, fsq_levels=4, hr_sample=2000, decode_hr_sample=50)
    cb1, t1, m1 = quantize_embeddings(x, ids, p)
    cb2, t2, m2 = quantize_embeddings(x.copy(), ids, p, inplace=True)
    assert t1.equals(t2)
    assert all(np.array_equal(a, b) for a, b in zip(cb1.centroids, cb2.centroids))
    assert {k: v for k, v in m1.items() if "seconds" not in k} == {k: v for k, v in m2.items() if "seconds" not in k}
    # the cold fit started from a warm-up sample (n / 4 rows) and still ends at a fixed point on all
    # rows: a warm restart on the same data changes nothing
    assert all(r["warmup_rows"] == 10_000 and r["converged"] for r in cb1.fit_report)
    cb3, t3, m3 = quantize_embeddings(x, ids, p, previous=cb1, previous_codes=t1)
    assert m3["churn"] == 0.0 and t3.equals(t1)
    assert all(np.array_equal(a, b) for a, b in zip(cb3.centroids, cb1.centroids))


def test_hit_rates_sampled_equals_full_on_queries_and_decode_known_answers():
    # HR: ranks do not depend on which other items are queried.
    x, _ = _emb(n=2000)
    keys = np.random.default_rng(0).integers(0, 50, 2000)
    xs = x * np.random.default_rng(1).uniform(0.5, 1.5, (2000, 1)).astype(np.float32)  # not unit norm
    full = hit_rates(xs, keys, ks=(1, 3))
    assert 0 < full["hr@1"] < 1
    assert hit_rates(xs, keys, ks=(1,), sample=2000)["hr@1"] == full["hr@1"]
    # decode HR: items 0, 1 share a SID decoding to (1, 0): item 0 at distance 0 ranks first,
    # item 1 (at (1, 0.5)) is beaten by item 0; item 2's decoding (0, 2) is nearer item 3 (0, 2.1)
    # than item 2 itself (0, 3): miss at 1, hit at 2; item 3 decodes to itself.
    pts = np.array([[1, 0], [1, 0.5], [0, 3], [0, 2.1]], np.float32)
    dec = np.array([[1, 0], [1, 0], [0, 2], [0, 2.1]], np.float32)
    r = decode_hit_rates(pts, 4, {"t": lambda rows: dec[rows]}, ks=(1, 2), sample=None)
    assert r == {"t.decode_hr@1": 0.5, "t.decode_hr@2": 1.0}



@pytest.mark.parametrize("chunk,threads", [(None, 2), (37, 2), (37, 1), (10_000, 2)])
def test_decode_hit_rates_equal_the_numpy_expression(chunk, threads, monkeypatch):
    """The compiled count over catalog blocks gives the counts of the float32 numpy expression it
    replaced (ties included: coordinates on a 0.1 grid), for any block size and thread count."""
    import qarm_core.quantize.metrics as M

    monkeypatch.setattr(M, "threads", lambda: threads)
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal((3000, 3)), 1).astype(np.float32)
    noise = rng.standard_normal((3000, 3)).astype(np.float32) * 0.3
    decoders = {"near": lambda r: x[r] + 0.1, "noisy": lambda r: x[r] + noise[r]}
    ks = (1, 2, 5, 20, 100)
    got = decode_hit_rates(lambda s: x[s], len(x), decoders, ks=ks, sample=400, chunk=chunk)

    q = np.sort(np.random.default_rng(0).choice(len(x), 400, replace=False))
    want = {}
    for name, dec in decoders.items():
        dq = dec(q).astype(np.float32)
        own = ((x[q].astype(np.float64) - dq) ** 2).sum(1).astype(np.float32)
        qn = (dq.astype(np.float64) ** 2).sum(1).astype(np.float32)
        d = (x * x).sum(1)[None, :] - 2.0 * (dq @ x.T) + qn[:, None]
        better = d <= own[:, None]
        better[np.arange(len(q)), q] = False
        beaten = better.sum(1)
        want |= {f"{name}.decode_hr@{k}": float((beaten + 1 <= k).mean()) for k in ks}
    assert got == want
    assert 0 < got["noisy.decode_hr@1"] < got["noisy.decode_hr@20"] < 1

def test_reconstruction_mse_formula_equals_decoding():
    r = np.random.default_rng(0).standard_normal((5000, 12)).astype(np.float32) * np.arange(1, 13)
    f = F.fit_fsq(r, 3, 4)
    d = F.digits_of(f, F.project(f, r))
    direct = float(((r - F.decode(f, d)) ** 2).sum(1).mean())
    assert F.reconstruction_mse(f, r, d) == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("mutate,match", [
    (lambda x, i: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), i), "1 embeddings hold NaN/inf"),
    (lambda x, i: (x[:0], i[:0]), "no embeddings"),
    (lambda x, i: (x[:10], i[:10]), "10 items is fewer than K=16"),
    (lambda x, i: (x[0], i), "must be 2-D"),
    (lambda x, i: (x, np.zeros_like(i)), "duplicate item ids"),
])
def test_fit_rejects_bad_input_naming_stage_and_dataset(mutate, match):
    x, ids = _emb(n=100)
    bx, bi = mutate(x, ids)
    with pytest.raises(DataError, match=r"^\[stage=quantize, dataset=items_v2\] .*" + match):
        quantize_embeddings(bx, bi, P, dataset="items_v2")


def test_frozen_encode_rejects_wrong_dim_and_nan():
    x, ids = _emb(n=500)
    cb, _, _ = quantize_embeddings(x, ids, P)
    with pytest.raises(DataError, match=r"\[stage=quantize, dataset=embeddings\] embedding dim 20 != codebook dim 24"):
        assign_semantic_ids(x[:, :20], ids, cb)
    bad = x.copy()
    bad[3, 0] = np.inf
    with pytest.raises(DataError, match=r"NaN/inf, e.g. item ids \[22\]"):
        assign_semantic_ids(bad, ids, cb)
    assert assign_semantic_ids(x[:3], ids[:3], cb)[0].num_rows == 3     # fewer items than K is fine frozen


def test_sid_strings_equal_arrow_formatting_and_split_into_chunks():
    import pyarrow.compute as pc

    rng = np.random.default_rng(0)
    n = 5000
    c1, c2, c3 = rng.integers(0, 300, n), rng.integers(0, 10 ** 6, n), rng.integers(0, 2 ** 40, n)
    suffix = np.where(rng.random(n) < 0.3, rng.integers(1, 10 ** 5, n), 0)
    c1[:2], c2[:2], c3[:2] = 0, 0, 0
    base = pc.binary_join_element_wise(*[pc.cast(pa.array(a), pa.string()) for a in (c1, c2, c3)], "-")
    expected = pc.if_else(pa.array(suffix > 0),
                          pc.binary_join_element_wise(base, pc.cast(pa.array(suffix), pa.string()), "-"), base)
    got = sid_strings(c1, c2, c3, suffix)
    assert got.type == pa.string() and got.equals(expected)
    chunked = sid_strings(c1, c2, c3, suffix, max_chunk_bytes=1000)      # ~130 chunks of <= 1000 bytes
    assert chunked.num_chunks > 50 and all(c.buffers()[2].size <= 1000 for c in chunked.chunks)
    assert chunked.combine_chunks().equals(expected)
    assert len(sid_strings(c1[:0], c2[:0], c3[:0], suffix[:0])) == 0
    with pytest.raises(ValueError, match="non-negative"):
        sid_strings(c1 - 1, c2, c3, suffix)


def test_hit_rates_on_one_big_group_equal_brute_force_in_batches():
    """Every item under one key (a degenerate code): the queries are scored in batches against the
    whole group, and the ranks equal a brute-force count (ties against the item)."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3000, 6)) * rng.uniform(0.5, 1.5, (3000, 1))).astype(np.float32)
    x[1] = x[0]                                                   # an exact duplicate: both miss at 1
    keys = np.zeros(3000, np.int64)
    s = np.einsum("id,jd->ij", x, x)
    own = np.diag(s)[:, None]
    ranks = 1 + ((s >= own) & ~np.eye(3000, dtype=bool)).sum(1)
    got = hit_rates(x, keys, ks=(1, 5, 50), max_group=4096)
    assert got == {f"hr@{k}": float((ranks <= k).mean()) for k in (1, 5, 50)}
    assert ranks[0] > 1 and ranks[1] > 1 and 0 < got["hr@1"] < 1


@pytest.mark.parametrize("n_tables", [0, 1, 2])
def test_hit_rates_equal_a_per_query_count(n_tables):
    """Plain rows, or rows rebuilt from a base plus one or two label tables (the quantizer's
    residual + centroids), on a sample of queries: each query's rank equals a plain count over its
    group (duplicates tie against the item); groups of one rank first; big groups are sampled."""
    rng = np.random.default_rng(4)
    n, d = 4000, 12
    base = (rng.standard_normal((n, d)) * rng.uniform(0.5, 1.5, (n, 1))).astype(np.float32)
    tables = [(rng.standard_normal((7, d)).astype(np.float32), rng.integers(0, 7, n).astype(np.int32))
              for _ in range(n_tables)]
    x = base.copy()
    for t, lab in tables:
        x = x + t[lab]                                          # float32, in order, as the kernel
    base[11], base[27] = base[10], base[26]
    for t, lab in tables:
        lab[11], lab[27] = lab[10], lab[26]
    x[11], x[27] = x[10], x[26]                                 # exact duplicates
    keys = rng.integers(0, 600, n) * 3
    keys[[10, 11, 26, 27]] = [1, 1, 4, 4]                      # duplicates share a group
    keys[:5] = 10_000 + np.arange(5)                            # groups of one
    q = np.sort(np.random.default_rng(9).choice(n, 1500, replace=False))
    ranks = []
    for i in q:
        g = np.flatnonzero(keys == keys[i])
        s = x[g].astype(np.float64) @ x[i].astype(np.float64)
        own = float(x[i].astype(np.float64) @ x[i].astype(np.float64))
        ranks.append(1 + int(((s >= own) & (g != i)).sum()))
    ranks = np.array(ranks)
    want = {f"hr@{k}": float((ranks <= k).mean()) for k in (1, 2, 5)}
    assert 0 < want["hr@1"] < 1
    # the sample: the same seeded draw as hit_rates' (queries = rows of q)
    assert hit_rates(base, keys, ks=(1, 2, 5), sample=1500, seed=9, add=tuple(tables)) == want
    # one group over the whole catalog, sampled to 500 members: a rank counts sampled members only
    one = hit_rates(base, np.zeros(n, np.int64), ks=(1, 50), sample=300, seed=1, max_group=500, add=tuple(tables))
    full = hit_rates(base, np.zeros(n, np.int64), ks=(1, 50), sample=300, seed=1, max_group=n, add=tuple(tables))
    assert 0 < one["hr@50"] and one["hr@50"] > full["hr@50"]
    too_many = ((np.zeros((1, d), np.float32), np.zeros(n, np.int32)),) * 3
    with pytest.raises(ValueError, match="at most two tables"):
        hit_rates(base, keys, add=too_many)
    with pytest.raises(ValueError, match="labels of table 0 outside 0..0"):
        hit_rates(base, keys, add=((np.zeros((1, d), np.float32), np.ones(n, np.int32)),))
    with pytest.raises(ValueError, match="with 3999 labels"):
        hit_rates(base, keys, add=((np.zeros((1, d), np.float32), np.zeros(n - 1, np.int32)),))


def test_decode_hit_rates_scan_logs_progress_when_long(caplog, monkeypatch):
    """The catalog scan (~20 s at 10M items) reports rows scanned; a short scan stays quiet."""
    import logging

    x = np.random.default_rng(0).standard_normal((2000, 4)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="qarm_core.progress"):
        decode_hit_rates(x, len(x), {"a": lambda r: x[r]}, sample=50, chunk=100)
    assert caplog.records == []
    monkeypatch.setenv("QARM_PROGRESS_EVERY_S", "0")
    with caplog.at_level(logging.INFO, logger="qarm_core.progress"):
        decode_hit_rates(x, len(x), {"a": lambda r: x[r]}, sample=50, chunk=100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(ln.startswith("quantize: decode HR@k: 50 decodings scanning the catalog") for ln in lines)
    assert "2,000 rows" in lines[-1]
