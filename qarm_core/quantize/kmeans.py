"""Full-batch residual k-means on faiss (faiss-gpu when a GPU is present, else CPU).

faiss's k-means silently subsamples to ``max_points_per_centroid`` (default 256) points per centroid;
qarm fits on every point unless told otherwise, which is what "full batch" means here.
"""

from __future__ import annotations

import numpy as np

ASSIGN_CHUNK = 1_000_000
# Rows per chunk for (rows, dim) temporaries (centroid gathers, float64 sums): 256k x 128 x 8 B
# = 256 MB at most, so a 10M-row snapshot never needs a second full-size array.
TEMP_CHUNK = 262_144


def _faiss():
    import faiss  # lazily: ~0.3 s import
    return faiss


def gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def fit_kmeans(x: np.ndarray, k: int, *, seed: int = 0, niter: int = 20,
               init: np.ndarray | None = None, max_points_per_centroid: int | None = None) -> np.ndarray:
    """Centroids ``(k, dim)`` float32 of ``x`` ``(n, dim)``.

    ``max_points_per_centroid=None`` fits on all n points (full batch). ``init`` warm-starts from
    given centroids ``(k, dim)`` (e.g. the last published codebook).
    """
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means with k={k} needs at least {k} points, got {n}")
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, verbose=False, gpu=gpu_count() > 0,
                      max_points_per_centroid=max_points_per_centroid or max(n // k + 1, 256) * 4,
                      min_points_per_centroid=1)
    if max_points_per_centroid is None:
        km.cp.max_points_per_centroid = n  # never subsample
    if init is not None:
        km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
    else:
        km.train(x)
    return np.asarray(km.centroids, dtype=np.float32).copy()


def assign(x: np.ndarray, centroids: np.ndarray, chunk: int = ASSIGN_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: (labels ``(n,)`` int32, squared distances ``(n,)`` float32),
    computed in chunks so memory stays bounded for 10M+ rows."""
    faiss = _faiss()
    index = faiss.IndexFlatL2(centroids.shape[1])
    if gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(len(x), np.int32)
    dist = np.empty(len(x), np.float32)
    for lo in range(0, len(x), chunk):
        d, i = index.search(np.ascontiguousarray(x[lo:lo + chunk], dtype=np.float32), 1)
        labels[lo:lo + chunk], dist[lo:lo + chunk] = i[:, 0], d[:, 0]
    return labels, dist


def lloyd(x: np.ndarray, centroids: np.ndarray, max_iter: int = 10,
          tol: float = 1e-4) -> tuple[np.ndarray, int, bool]:
    """Lloyd iterations from ``centroids`` ``(k, dim)``, accepting an update only while it lowers
    the mean squared error by more than ``tol`` (relative).

    Returns (centroids, updates accepted, converged). Because an update that gains too little is
    rejected rather than applied, a codebook that came out of this function is returned unchanged
    when refitted from itself on the same data: a warm-started daily refresh on unchanged
    embeddings reproduces yesterday's codebook, and so its codes, exactly. Empty clusters keep their
    centroid; sums are accumulated in float64 by a sparse product, so results are deterministic.
    """
    from scipy.sparse import csr_matrix

    c = np.array(centroids, dtype=np.float32, copy=True)
    k = len(c)
    labels, dist = assign(x, c)
    err = float(dist.astype(np.float64).mean())
    for it in range(max_iter):
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros((k, x.shape[1]), np.float64)
        for lo in range(0, len(x), TEMP_CHUNK):  # chunked: no float64 copy of all of x
            part = labels[lo:lo + TEMP_CHUNK]
            onehot = csr_matrix((np.ones(len(part)), (part, np.arange(len(part)))), shape=(k, len(part)))
            sums += onehot @ x[lo:lo + TEMP_CHUNK].astype(np.float64)
        nonempty = counts > 0
        new = c.copy()
        new[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        new_labels, new_dist = assign(x, new)
        new_err = float(new_dist.astype(np.float64).mean())
        if err - new_err <= tol * err:
            return c, it, True
        c, labels, err = new, new_labels, new_err
    return c, max_iter, False


def match_to_previous(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Permutation ``perm`` (k,) such that ``new[perm]`` best matches ``old`` index by index
    (Hungarian on squared centroid distance), so that unchanged clusters keep their codes."""
    from scipy.optimize import linear_sum_assignment

    if new.shape != old.shape:
        raise ValueError(f"codebook shapes differ: new {new.shape} vs previous {old.shape}")
    cost = (old ** 2).sum(1)[:, None] - 2.0 * old @ new.T + (new ** 2).sum(1)[None, :]
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(old), np.int64)
    perm[rows] = cols
    return perm


def fit_level(residual: np.ndarray, k: int, *, seed: int = 0, niter: int = 20, polish_iter: int = 10,
              previous: np.ndarray | None = None, max_points_per_centroid: int | None = None,
              ) -> tuple[np.ndarray, dict]:
    """Centroids ``(k, dim)`` of one residual level, and a fit report.

    Cold: faiss k-means (``niter`` iterations, full batch) then Lloyd polishing to a fixed point.
    Warm (``previous`` given): Lloyd from the previous centroids, then a Hungarian match back to
    their indices, so unchanged clusters keep their codes.
    """
    if previous is not None:
        init = np.asarray(previous, dtype=np.float32)
        if init.shape != (k, residual.shape[1]):
            raise ValueError(f"previous codebook level has shape {init.shape}, expected {(k, residual.shape[1])}")
    else:
        init = fit_kmeans(residual, k, seed=seed, niter=niter, max_points_per_centroid=max_points_per_centroid)
    c, iters, converged = lloyd(residual, init, max_iter=polish_iter)
    if previous is not None:
        c = c[match_to_previous(c, init)]
    return c, {"k": k, "lloyd_iterations": iters, "converged": converged, "warm_start": previous is not None}


def assign_sticky(residual: np.ndarray, centroids: np.ndarray, previous: np.ndarray | None = None,
                  stickiness: float = 0.0, chunk: int = TEMP_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid per row (labels ``(n,)``, squared distances ``(n,)``); with ``previous``
    labels ``(n,)`` (-1 = none) and ``stickiness`` > 0 a row keeps its previous label while that
    centroid is within a factor (1 + stickiness) of the nearest one's squared distance, so that a
    refit that barely moved the centroids does not flip rows on cluster borders (SID churn)."""
    labels, dist = assign(residual, centroids)
    if previous is not None and stickiness > 0:
        idx = np.flatnonzero((previous >= 0) & (previous < len(centroids)) & (previous != labels))
        for lo in range(0, len(idx), chunk):
            part = idx[lo:lo + chunk]
            d_prev = ((residual[part] - centroids[previous[part]]) ** 2).sum(1)
            keep = d_prev <= dist[part] * (1.0 + stickiness)
            labels[part[keep]] = previous[part[keep]]
            dist[part[keep]] = d_prev[keep]
    return labels, dist


def subtract_centroids(residual: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                       chunk: int = TEMP_CHUNK) -> None:
    """``residual -= centroids[labels]`` in place, in chunks (no (n, dim) temporary)."""
    for lo in range(0, len(residual), chunk):
        residual[lo:lo + chunk] -= centroids[labels[lo:lo + chunk]]
