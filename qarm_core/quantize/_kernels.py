"""numba kernels of the quantizer: the row-wise parts of a k-means pass that BLAS cannot do
(argmin over a GEMM block, centroid sums) and per-cell collision resolution.

Imported lazily (numba's import costs ~0.5 s) and compiled once, cached on disk by numba.
Every reduction runs over a fixed partition of rows (``N_PARTS`` parts, independent of the thread
count) and is combined in a fixed order, so results are bitwise identical from run to run and
for any number of threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

N_PARTS = 8


@njit(cache=True, nogil=True)
def argmin_cols(gt, cn, xn, labels, best):
    """Per column i of ``gt`` ``(K, m)`` (= -2 C x^T): labels[i] = argmin_j gt[j, i] + cn[j] (the
    lowest j on ties), best[i] = that minimum. ``cn`` ``(K,)`` squared centroid norms, ``xn`` ``(m,)``
    squared row norms. Returns the float64 sum of the squared distances max(xn + best, 0).
    Column-major so that the inner loop runs over rows with SIMD compare-and-select (5x faster
    than a row-wise argmin)."""
    k, m = gt.shape
    for i in range(m):
        best[i] = gt[0, i] + cn[0]
        labels[i] = 0
    for j in range(1, k):
        cj = cn[j]
        for i in range(m):
            v = gt[j, i] + cj
            better = v < best[i]
            best[i] = v if better else best[i]
            labels[i] = j if better else labels[i]
    e = 0.0
    for i in range(m):
        e += max(np.float64(xn[i]) + np.float64(best[i]), 0.0)
    return e


@njit(cache=True, nogil=True)
def accumulate(x, labels, sums, counts, part):
    """Add the rows of ``x`` ``(m, d)`` to their centroid's float64 sum ``sums[part]`` ``(K, d)``
    and count them in ``counts[part]``. Callers give each chunk of rows a fixed part and feed a
    part its chunks in order, so the summation order never depends on the thread count."""
    m, d = x.shape
    for i in range(m):
        a = labels[i]
        counts[part, a] += 1
        for t in range(d):
            sums[part, a, t] += x[i, t]


@njit(parallel=True, cache=True, nogil=True)
def sq_dist_to(x, labels, c, out):
    """out[i] = ||x[i] - c[labels[i]]||^2 (float32 rows, float64 accumulation)."""
    m, d = x.shape
    for i in prange(m):
        a = labels[i]
        e = 0.0
        for t in range(d):
            diff = np.float64(x[i, t]) - np.float64(c[a, t])
            e += diff * diff
        out[i] = e


@njit(parallel=True, cache=True, nogil=True)
def subtract(x, labels, c):
    """x[i] -= c[labels[i]] in place."""
    m, d = x.shape
    for i in prange(m):
        a = labels[i]
        for t in range(d):
            x[i, t] -= c[a, t]


@njit(cache=True, nogil=True)
def _moves(z, digits, lo_b, hi_b, levels, n_alt, out_code, out_cost, cost_tmp, delta_tmp):
    """Packed codes of one row's next-best FSQ cells, cheapest first (ties: move order), as in
    ``fsq.alternatives``; returns how many are valid (<= n_alt)."""
    f = z.shape[0]
    base = 0
    w = 1
    for j in range(f):
        base += digits[j] * w
        w *= levels
    n_single = 2 * f
    single_cost = np.empty(n_single, np.float32)   # float32 like the reference: same tie order
    single_delta = np.empty(n_single, np.int64)
    w = 1
    for j in range(f):
        dj = digits[j]
        single_cost[j] = z[j] - lo_b[j, dj] if dj > 0 else np.inf
        single_cost[f + j] = hi_b[j, dj] - z[j] if dj < levels - 1 else np.inf
        single_delta[j] = -w
        single_delta[f + j] = w
        w *= levels
    nm = 0
    for a in range(n_single):
        cost_tmp[nm] = single_cost[a]
        delta_tmp[nm] = single_delta[a]
        nm += 1
    for a in range(n_single):
        for b in range(a + 1, n_single):
            if a % f != b % f:
                cost_tmp[nm] = single_cost[a] + single_cost[b]
                delta_tmp[nm] = single_delta[a] + single_delta[b]
                nm += 1
    order = np.argsort(cost_tmp[:nm], kind="mergesort")
    nv = 0
    for q in range(min(n_alt, nm)):
        o = order[q]
        if np.isfinite(cost_tmp[o]):
            out_code[q] = base + delta_tmp[o]
            out_cost[q] = cost_tmp[o]
        else:
            out_code[q] = -1
        nv += 1
    for q in range(nv, n_alt):
        out_code[q] = -1
    return min(n_alt, nm)


@njit(cache=True, nogil=True)
def _find(sorted_arr, n, v):
    """Index of v in the first n entries of sorted_arr, or -1."""
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) >> 1
        if sorted_arr[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    if lo < n and sorted_arr[lo] == v:
        return lo
    return -1


@njit(cache=True, nogil=True)
def _insert(sorted_arr, n, v):
    """Insert v into the sorted first n entries (capacity permitting); returns the new n."""
    i = n
    while i > 0 and sorted_arr[i - 1] > v:
        sorted_arr[i] = sorted_arr[i - 1]
        i -= 1
    sorted_arr[i] = v
    return n + 1


@njit(parallel=True, cache=True, nogil=True)
def resolve_cells(cell_ptr, order, c3, is_outside, z, digits, lo_b, hi_b, levels, n_alt,
                  new_c3, suffix, moved):
    """Collision resolution, one (c1, c2) cell at a time (cells are independent: a move changes c3
    only).

    ``order`` lists rows grouped by cell and, within a cell, by (raw c3, priority, row);
    ``cell_ptr`` delimits the cells in it. Rows with ``is_outside`` set hold their c3 as a fixed,
    already-occupied code (e.g. SIDs carried over from the last snapshot) and take no part
    otherwise. Of the other rows, the first holder of each free raw code keeps it; every later
    holder is a mover. In round r every still-pending mover, in order, takes its r-th alternative
    cell if that code is free (codes taken earlier in the round count as taken); movers left after
    n_alt rounds get a dedup suffix numbered within their code. Equals the vectorised reference
    ``sid.resolve_collisions`` row for row.
    """
    n_cells = cell_ptr.shape[0] - 1
    f = z.shape[1]
    n_moves = 2 * f + 2 * f * (2 * f - 2) // 2
    for cell in prange(n_cells):
        lo = cell_ptr[cell]
        hi = cell_ptr[cell + 1]
        size = hi - lo
        if size == 0:
            continue
        cap = 2 * size + 1                  # distinct raw codes + one code per mover at most
        occ = np.empty(cap, np.int64)
        n_occ = 0
        # codes held from outside, then every raw code of the rest
        outside = np.empty(size, np.int64)
        n_out = 0
        for q in range(lo, hi):
            r = order[q]
            if is_outside[r]:
                outside[n_out] = c3[r]
                n_out += 1
        outside = np.sort(outside[:n_out])
        for q in range(lo, hi):
            v = c3[order[q]]
            if _find(occ, n_occ, v) < 0:
                n_occ = _insert(occ, n_occ, v)
        movers = np.empty(size, np.int64)
        n_mov = 0
        prev = np.int64(-1)
        first = True
        for q in range(lo, hi):
            r = order[q]
            if is_outside[r]:
                continue
            v = c3[r]
            if (first or v != prev) and _find(outside, n_out, v) < 0:
                pass                                   # first holder of a free code keeps it
            else:
                movers[n_mov] = r
                n_mov += 1
            first = False
            prev = v
        if n_mov == 0:
            continue
        alt = np.empty((n_mov, n_alt), np.int64)
        out_cost = np.empty(n_alt, np.float32)
        cost_tmp = np.empty(n_moves, np.float32)
        delta_tmp = np.empty(n_moves, np.int64)
        for m in range(n_mov):
            r = movers[m]
            _moves(z[r], digits[r], lo_b, hi_b, levels, n_alt, alt[m], out_cost, cost_tmp, delta_tmp)
        pending = np.ones(n_mov, np.bool_)
        n_pending = n_mov
        for rnd in range(n_alt):
            if n_pending == 0:
                break
            for m in range(n_mov):
                if not pending[m]:
                    continue
                cand = alt[m, rnd]
                if cand >= 0 and _find(occ, n_occ, cand) < 0:
                    n_occ = _insert(occ, n_occ, cand)
                    r = movers[m]
                    new_c3[r] = cand
                    moved[r] = True
                    pending[m] = False
                    n_pending -= 1
        if n_pending:
            # last resort: suffix, numbered within each still-shared code in (code, order) order
            left = np.empty(n_pending, np.int64)
            keys = np.empty(n_pending, np.int64)
            t = 0
            for m in range(n_mov):
                if pending[m]:
                    left[t] = movers[m]
                    keys[t] = c3[movers[m]]
                    t += 1
            o = np.argsort(keys, kind="mergesort")
            run = 0
            for t in range(n_pending):
                if t > 0 and keys[o[t]] == keys[o[t - 1]]:
                    run += 1
                else:
                    run = 1
                suffix[left[o[t]]] = run
