"""Full-batch residual k-means: Lloyd iterations over every row, built on numpy's sgemm.

One k-means pass over ``x`` ``(n, dim)`` with centroids ``C`` ``(K, dim)`` runs in row chunks:
``G = -2 C x_chunk^T`` (BLAS sgemm, the only O(n K dim) step), then numba kernels take the argmin of
``G + ||c||^2`` per row (``||x||^2`` is constant per row, so it is only added for the error) and add
the rows to their centroid's float64 sum. Assignment, centroid sums and the error thus cost one pass,
with no (n, K) or second (n, dim) array. faiss's IndexFlatL2 search reached only 8-16 GFLOP/s here
against 70-99 for numpy's sgemm (same machine, same run), so faiss is used only on a GPU (to
initialise; told explicitly not to subsample: its default trains on 256 points per centroid).

Every pass is deterministic: fixed chunks, fixed reduction order (see ``_kernels``), ties to the
lowest centroid index, for any number of threads.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from qarm_core.progress import Progress, advance

STAGE = "quantize"
# Rows per GEMM block: each thread's (K, CHUNK) float32 block (16 MB at K = 256) is written by
# the sgemm and read back by the argmin while still in the 32 MB L3 cache; smaller blocks lose
# sgemm efficiency (measured: 4k rows ~30 GFLOP/s, 16k rows ~90-105 single-threaded).
CHUNK = 16384
# Rows per chunk for (rows, dim) temporaries elsewhere: 256k x 128 x 4 B = 128 MB at most.
TEMP_CHUNK = 262_144


def _k():
    from qarm_core.devices import numba_without_openmp

    numba_without_openmp()
    from qarm_core.quantize import _kernels  # lazily: numba's import costs ~0.5 s
    return _kernels


def _faiss():
    import faiss  # lazily: ~0.3 s import
    return faiss


def gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def fit_kmeans_faiss(x: np.ndarray, k: int, *, seed: int = 0, niter: int = 20,
                     max_points_per_centroid: int | None = None) -> np.ndarray:
    """Centroids ``(k, dim)`` from faiss k-means on ``x`` ``(n, dim)`` (used on a GPU).

    ``max_points_per_centroid=None`` fits on all n points: faiss subsamples when n exceeds
    k * max_points_per_centroid (default 256), so it is set to ceil(n / k) explicitly.
    """
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means with k={k} needs at least {k} points, got {n}")
    mppc = max_points_per_centroid if max_points_per_centroid is not None else -(-n // k)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, verbose=False, gpu=gpu_count() > 0,
                      max_points_per_centroid=mppc, min_points_per_centroid=1)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32).copy()


def init_centroids(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``k`` distinct rows of ``x`` ``(n, dim)`` chosen by a seeded generator (faiss's own init)."""
    n = len(x)
    if n < k:
        raise ValueError(f"k-means with k={k} needs at least {k} points, got {n}")
    rows = np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
    return np.array(x[rows], dtype=np.float32)


def threads() -> int:
    """Worker threads for k-means passes: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def take_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``x[rows]`` ``(len(rows), dim)`` for ``x`` ``(n, dim)``, gathered on a thread per core when
    large (the warm-up and FSQ samples of a 10M-item snapshot: 0.5 s each on one thread)."""
    if len(rows) * x.shape[1] < (1 << 22) or not x.flags.c_contiguous:
        return x[rows]
    out = np.empty((len(rows), x.shape[1]), x.dtype)
    _k().take_rows(x, np.ascontiguousarray(rows, np.int64), out)
    return out


def row_sqnorms(x: np.ndarray, n_threads: int | None = None) -> np.ndarray:
    """``(n,)`` float32 squared norms of the rows of ``x`` ``(n, dim)``: einsum over chunks of
    ``TEMP_CHUNK`` rows on a thread per core (einsum releases the GIL; each row's sum does not
    depend on the chunking, so the values equal one einsum over all rows). One thread took
    0.43 s for 10M x 128 rows, six times per 10M-item stage; two threads 0.22 s."""
    n = len(x)
    t = max(1, min(n_threads or threads(), -(-n // TEMP_CHUNK)))
    if t == 1:
        return np.einsum("ij,ij->i", x, x)
    out = np.empty(n, np.result_type(x.dtype, np.float32))

    def work(owner: int) -> None:
        for lo in range(owner * TEMP_CHUNK, n, t * TEMP_CHUNK):
            part = x[lo:lo + TEMP_CHUNK]
            np.einsum("ij,ij->i", part, part, out=out[lo:lo + TEMP_CHUNK])

    run_on_threads(work, t)
    return out


def _pass(x: np.ndarray, c: np.ndarray, labels: np.ndarray, xn: np.ndarray | None = None,
          n_threads: int | None = None, *, with_sums: bool = True,
          moved_from: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
          ) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """One k-means pass: writes each row's nearest centroid into ``labels`` ``(n,)`` int32 and returns
    (float64 sums per centroid ``(K, dim)``, counts ``(K,)``, total squared error). ``xn`` ``(n,)``:
    the rows' squared norms if already known (the error is ||x||^2 + min_j (||c_j||^2 - 2 x.c_j),
    summed in float64). ``with_sums=False``: assignment only, sums and counts are None.
    ``moved_from=(previous_labels (n,), their sums (K, dim), their counts (K,))``: the sums are
    those, updated by the rows whose label changed (``_kernels.accumulate_moves``), instead of
    every row added again: the sums and their adds cost ~8% of a pass on top of the sgemm, and
    after the first passes of a fit a few percent of the rows move (the float64 sums then differ
    from a fresh summation by rounding, ~1e-16 relative; counts are exact).

    Chunks of CHUNK rows are spread over ``n_threads`` Python threads, each running a
    single-threaded sgemm and the numba kernels (all release the GIL): one BLAS thread per core
    avoids OpenBLAS and numba thread pools spinning against each other, and the argmin and sums of
    one chunk overlap the sgemm of another. Chunk i adds into part i % N_PARTS, and each part is
    owned by one thread that takes its chunks in order, so sums are identical for any thread count.

    Every row is searched against every centroid. Hamerly's bounds (skip rows whose label cannot
    change) were tried and measured: at 128-d with K = 256 they skipped only ~40% of rows late in
    the fit (the gap between nearest and second-nearest centroid is small next to the largest
    centroid move), and the gathers cost more than the sgemm saved (200k rows: 14.0 s with, 13.9 s
    without).
    """
    kk = _k()
    k, d = c.shape
    n = len(x)
    w = np.ascontiguousarray(-2.0 * c, dtype=np.float32)                # (K, dim)
    cn = (c.astype(np.float64) ** 2).sum(1).astype(np.float32)          # (K,)
    s = np.zeros((kk.N_PARTS, k, d), np.float64)
    cnt = np.zeros((kk.N_PARTS, k), np.int64)
    err = np.zeros(kk.N_PARTS, np.float64)
    xn = row_sqnorms(x) if xn is None else xn
    previous = None if moved_from is None else moved_from[0]
    n_chunks = -(-n // CHUNK)
    t = max(1, min(n_threads or threads(), kk.N_PARTS, n_chunks))

    def work(owner: int) -> None:
        gbuf = np.empty(k * CHUNK, np.float32)
        best = np.empty(CHUNK, np.float32)
        for i in range(n_chunks):
            part = i % kk.N_PARTS
            if part % t != owner:
                continue
            lo = i * CHUNK
            xc = x[lo:lo + CHUNK]
            m = len(xc)
            g = gbuf[:k * m].reshape(k, m)
            np.matmul(w, xc.T, out=g)                                   # (K, m) = -2 C x^T
            err[part] += kk.argmin_cols(g, cn, xn[lo:lo + m], labels[lo:lo + m], best[:m])
            if previous is not None:
                kk.accumulate_moves(xc, labels[lo:lo + m], previous[lo:lo + m], s, cnt, part)
            elif with_sums:
                kk.accumulate(xc, labels[lo:lo + m], s, cnt, part)

    run_on_threads(work, t)
    if moved_from is not None:
        # the previous pass's sums plus each part's moves, in part order (fixed for any thread count)
        sums, counts = moved_from[1].copy(), moved_from[2].copy()
        for part in range(kk.N_PARTS):
            sums += s[part]
            counts += cnt[part]
        return sums, counts, float(err.sum())
    if not with_sums:
        return None, None, float(err.sum())
    return s.sum(0), cnt.sum(0), float(err.sum())


def run_on_threads(work: Callable[[int], None], n_threads: int) -> None:
    """``work(owner)`` for each owner in 0..n_threads-1, each on its own Python thread with BLAS
    limited to one thread: one single-threaded sgemm per core, and numba kernels (which release the
    GIL) between them. An exception in any worker is raised here."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        if n_threads == 1:
            work(0)
        else:
            with ThreadPoolExecutor(n_threads) as pool:
                for f in [pool.submit(work, o) for o in range(n_threads)]:
                    f.result()


def assign(x: np.ndarray, centroids: np.ndarray, with_dist: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Nearest centroid of each row of ``x`` ``(n, dim)``: (labels ``(n,)`` int32, exact squared
    distances ``(n,)`` float32, or None without ``with_dist``)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    labels = np.empty(len(x), np.int32)
    _pass(x, c, labels, with_sums=False)
    return labels, sq_dist(x, c, labels) if with_dist else None


def sq_dist(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """``(n,)``: ||x_i - centroids[labels_i]||^2, accumulated in float64, returned as ``dtype``."""
    out = np.empty(len(x), np.float64)
    _k().sq_dist_to(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(labels, dtype=np.int32),
                    np.ascontiguousarray(centroids, dtype=np.float32), out)
    return out if dtype is np.float64 else out.astype(dtype)


def lloyd(x: np.ndarray, centroids: np.ndarray, max_iter: int = 10, tol: float = 1e-4,
          progress: "Progress | None" = None) -> tuple[np.ndarray, np.ndarray, float, int, bool]:
    """Lloyd iterations from ``centroids`` ``(k, dim)`` over all rows of ``x`` ``(n, dim)``,
    accepting an update only while it lowers the mean squared error by more than ``tol`` (relative).

    Returns (centroids, labels ``(n,)`` int32 under them, their MSE, updates accepted, converged).
    Because an update that gains too little is rejected rather than applied, a codebook that came
    out of this function converged is returned unchanged when refitted from itself on the same data:
    a warm-started daily refresh on unchanged embeddings reproduces yesterday's codebook, and so its
    codes, exactly. Empty clusters keep their centroid. One pass (GEMM + argmin + sums) per iteration;
    ``progress`` advances by one per pass, with the MSE.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = np.array(centroids, dtype=np.float32, copy=True)
    n = len(x)
    labels, spare = np.empty(n, np.int32), np.empty(n, np.int32)
    xn = row_sqnorms(x)
    sums, counts, err = _pass(x, c, labels, xn)
    advance(progress, 1, mse=err / max(n, 1))
    for it in range(max_iter):
        nonempty = counts > 0
        new = c.copy()
        new[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        # the sums under ``new`` are those under ``c`` plus the rows that changed centroid
        new_sums, new_counts, new_err = _pass(x, new, spare, xn, moved_from=(labels, sums, counts))
        advance(progress, 1, mse=new_err / max(n, 1))
        if err - new_err <= tol * err:
            return c, labels, err / max(n, 1), it, True
        c, sums, counts, err = new, new_sums, new_counts, new_err
        labels, spare = spare, labels
    return c, labels, err / max(n, 1), max_iter, False


def match_to_previous(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Permutation ``perm`` (k,) such that ``new[perm]`` best matches ``old`` index by index
    (Hungarian on squared centroid distance), so that unchanged clusters keep their codes."""
    from scipy.optimize import linear_sum_assignment

    if new.shape != old.shape:
        raise ValueError(f"codebook shapes differ: new {new.shape} vs previous {old.shape}")
    old64, new64 = old.astype(np.float64), new.astype(np.float64)
    cost = (old64 ** 2).sum(1)[:, None] - 2.0 * old64 @ new64.T + (new64 ** 2).sum(1)[None, :]
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(old), np.int64)
    perm[rows] = cols
    return perm


def fit_level(residual: np.ndarray, k: int, *, seed: int = 0, niter: int = 20, polish_iter: int = 10,
              previous: np.ndarray | None = None, tol: float = 1e-4, warmup_rows: int = 0,
              warm_iter: int | None = None) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """Fit one residual level on every row of ``residual`` ``(n, dim)``.

    Cold: ``k`` seeded distinct rows (on a GPU: faiss k-means, full batch), then up to
    ``niter + polish_iter`` Lloyd iterations over all rows, stopping once an update gains less than
    ``tol``. With 0 < ``warmup_rows`` < n, the seeded rows are first refined by
    Lloyd (same stopping rule, up to ``niter``) on a seeded sample of ``warmup_rows`` rows: only the
    starting point changes, the fit itself still runs to its fixed point on all n rows, in about
    half the full passes (1M x 128, K = 256: 12 full passes instead of 23, MSE 0.8624 vs 0.8632).
    Warm (``previous`` ``(k, dim)`` given): up to ``warm_iter`` (default ``polish_iter``) Lloyd
    iterations from it, then a Hungarian match back to its indices, so unchanged clusters keep their codes.
    Returns (centroids ``(k, dim)``, labels ``(n,)`` int32, MSE, fit report).
    """
    report: dict = {"k": k, "warm_start": previous is not None}
    if previous is not None:
        init = np.asarray(previous, dtype=np.float32)
        if init.shape != (k, residual.shape[1]):
            raise ValueError(f"previous codebook level has shape {init.shape}, expected {(k, residual.shape[1])}")
        max_iter = polish_iter if warm_iter is None else warm_iter
    elif gpu_count() > 0:
        init = fit_kmeans_faiss(residual, k, seed=seed, niter=niter)
        max_iter = polish_iter
    else:
        init = init_centroids(residual, k, seed)
        max_iter = niter + polish_iter
        if 0 < warmup_rows < len(residual):
            rows = np.sort(np.random.default_rng([seed, 1]).choice(len(residual), warmup_rows, replace=False))
            sample = take_rows(residual, rows)
            with Progress(STAGE, f"k={k} warm-up Lloyd passes over a sample of {warmup_rows:,} rows",
                          niter + 1, "passes") as prog:
                init, _, _, w_iters, w_conv = lloyd(sample, init, max_iter=niter, tol=tol, progress=prog)
            del sample
            report |= {"warmup_rows": int(warmup_rows), "warmup_iterations": w_iters, "warmup_converged": w_conv}
    with Progress(STAGE, f"k={k} full-batch Lloyd passes over {len(residual):,} rows (at most)",
                  max_iter + 1, "passes") as prog:
        c, labels, mse, iters, converged = lloyd(residual, init, max_iter=max_iter, tol=tol, progress=prog)
    if previous is not None:
        perm = match_to_previous(c, init)
        c = c[perm]
        inv = np.empty(k, np.int32)
        inv[perm] = np.arange(k, dtype=np.int32)
        labels = inv[labels]
    return c, labels, mse, report | {"lloyd_iterations": iters, "converged": converged, "mse": mse}


def sticky(residual: np.ndarray, centroids: np.ndarray, labels: np.ndarray, previous: np.ndarray,
           stickiness: float, chunk: int = TEMP_CHUNK) -> np.ndarray:
    """``labels`` ``(n,)`` with each row's ``previous`` label ``(n,)`` (-1 = none) kept while that
    centroid is within a factor (1 + stickiness) of the nearest one's squared distance, so that a
    refit that barely moved the centroids does not flip rows on cluster borders (SID churn)."""
    labels = labels.copy()
    if stickiness <= 0:
        return labels
    idx = np.flatnonzero((previous >= 0) & (previous < len(centroids)) & (previous != labels))
    for lo in range(0, len(idx), chunk):
        part = idx[lo:lo + chunk]
        d_new = sq_dist(residual[part], centroids, labels[part])
        d_prev = sq_dist(residual[part], centroids, previous[part])
        keep = d_prev <= d_new * (1.0 + stickiness)
        labels[part[keep]] = previous[part[keep]]
    return labels


def subtract_centroids(residual: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> None:
    """``residual -= centroids[labels]`` in place (no (n, dim) temporary)."""
    _k().subtract(residual, np.ascontiguousarray(labels, dtype=np.int32),
                  np.ascontiguousarray(centroids, dtype=residual.dtype))
