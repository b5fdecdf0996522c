"""numba kernels of the quantizer: the row-wise parts of a k-means pass that BLAS cannot do
(argmin over a GEMM block, centroid sums), per-cell collision resolution (with the counting sort
that groups rows by cell) and the SID strings' Arrow buffers.

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
    than a row-wise argmin), four centroids per sweep over the rows: the running minima and
    labels are read and written once per four centroid rows instead of once per row, which was
    what bounded the kernel (2.25 -> 0.78 ms for a 256 x 16,384 block). Same values, same ties."""
    k, m = gt.shape
    for i in range(m):
        best[i] = gt[0, i] + cn[0]
        labels[i] = 0
    j = 1
    while j + 3 < k:
        c0, c1, c2, c3 = cn[j], cn[j + 1], cn[j + 2], cn[j + 3]
        j0, j1, j2, j3 = np.int32(j), np.int32(j + 1), np.int32(j + 2), np.int32(j + 3)
        g0, g1, g2, g3 = gt[j], gt[j + 1], gt[j + 2], gt[j + 3]
        for i in range(m):
            v0 = g0[i] + c0
            v1 = g1[i] + c1
            v2 = g2[i] + c2
            v3 = g3[i] + c3
            # strict < throughout: on a tie the lower centroid index stays
            b01 = v1 < v0
            v01 = v1 if b01 else v0
            l01 = j1 if b01 else j0
            b23 = v3 < v2
            v23 = v3 if b23 else v2
            l23 = j3 if b23 else j2
            b = v23 < v01
            v = v23 if b else v01
            lab = l23 if b else l01
            better = v < best[i]
            best[i] = v if better else best[i]
            labels[i] = lab if better else labels[i]
        j += 4
    while j < k:
        cj = cn[j]
        jj = np.int32(j)
        for i in range(m):
            v = gt[j, i] + cj
            better = v < best[i]
            best[i] = v if better else best[i]
            labels[i] = jj if better else labels[i]
        j += 1
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


@njit(cache=True, nogil=True)
def accumulate_moves(x, labels, previous, sums, counts, part):
    """Move the rows of ``x`` ``(m, d)`` whose label changed from ``previous[i]`` to ``labels[i]``:
    subtract each from its old centroid's float64 sum ``sums[part]`` ``(K, d)`` and add it to its
    new one (counts likewise). Rows whose label stayed are not read: late in a fit a few percent
    of rows move, so a pass's sums cost that share of ``accumulate``. Same fixed part order."""
    m, d = x.shape
    for i in range(m):
        a = labels[i]
        b = previous[i]
        if a == b:
            continue
        counts[part, a] += 1
        counts[part, b] -= 1
        for t in range(d):
            v = np.float64(x[i, t])
            sums[part, a, t] += v
            sums[part, b, t] -= v


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


@njit(cache=True, nogil=True, inline="always")
def _rebuild(base, t0, l0, t1, l1, r, out):
    """out[:] = (base[r] + t0[l0[r]]) + t1[l1[r]], float32, added in this order."""
    a, b = l0[r], l1[r]
    for t in range(out.shape[0]):
        out[t] = (base[r, t] + t0[a, t]) + t1[b, t]


@njit(cache=True, nogil=True, inline="always")
def _dot8(u, v):
    """float32 inner product in eight interleaved partial sums (a fixed order the compiler can run
    as SIMD without fast-math); the same inputs give the same value wherever it is called."""
    d = u.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    t = 0
    while t + 7 < d:
        s0 += u[t] * v[t]
        s1 += u[t + 1] * v[t + 1]
        s2 += u[t + 2] * v[t + 2]
        s3 += u[t + 3] * v[t + 3]
        s4 += u[t + 4] * v[t + 4]
        s5 += u[t + 5] * v[t + 5]
        s6 += u[t + 6] * v[t + 6]
        s7 += u[t + 7] * v[t + 7]
        t += 8
    while t < d:
        s0 += u[t] * v[t]
        t += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(parallel=True, cache=True, nogil=True)
def rank_in_groups(base, t0, l0, t1, l1, members, member_group, queries, q_ptr, ranks):
    """HR@k's ranks. Item r's vector is (base[r] + t0[l0[r]]) + t1[l1[r]] (float32; zero tables
    for plain rows), rebuilt here: no (rows, d) copy is made. ``members`` ``(m,)``: the catalog
    rows of the queried groups in increasing order, ``member_group`` ``(m,)`` their group; group
    g's queries are catalog rows ``queries[q_ptr[g]:q_ptr[g + 1]]``. ranks[i] (aligned with
    ``queries``) = 1 + the number of members of its group other than its own row whose inner
    product with the query is >= the query's with itself.

    The members are swept in row order, in ``N_PARTS`` slices each counting into its own row of
    counters: the queried groups of a sampled 10M-item snapshot hold most of its rows, and reading
    them group by group (rows far apart) ran at a third of this speed. Every product is computed by
    the same function, so an exact duplicate ties and counts against the item."""
    d = base.shape[1]
    nq = queries.shape[0]
    qv = np.empty((nq, d), np.float32)
    own = np.empty(nq, np.float32)
    for i in prange(nq):
        _rebuild(base, t0, l0, t1, l1, queries[i], qv[i])
        own[i] = _dot8(qv[i], qv[i])
    m = members.shape[0]
    counts = np.zeros((N_PARTS, nq), np.int64)
    for part in prange(N_PARTS):
        v = np.empty(d, np.float32)
        for j in range(part * m // N_PARTS, (part + 1) * m // N_PARTS):
            r = members[j]
            g = member_group[j]
            _rebuild(base, t0, l0, t1, l1, r, v)
            for i in range(q_ptr[g], q_ptr[g + 1]):
                if r != queries[i] and _dot8(v, qv[i]) >= own[i]:
                    counts[part, i] += 1
    for i in prange(nq):
        c = 0
        for part in range(N_PARTS):
            c += counts[part, i]
        ranks[i] = 1 + c


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
def sq_dist_total(x, labels, c):
    """sum_i ||x[i] - c[labels[i]]||^2 in float64 over rows of ``x`` ``(m, d)`` float32, rows in
    ``N_PARTS`` fixed slices added in order. Each row's sum may be reassociated by the compiler
    (SIMD: 5x faster than one running float64 sum, which the add latency bounded), so its last
    bits may differ between CPUs of different vector widths; on one CPU the value is the same for
    any thread count."""
    m, d = x.shape
    parts = np.zeros(N_PARTS, np.float64)
    for part in prange(N_PARTS):
        tot = 0.0
        for i in range(part * m // N_PARTS, (part + 1) * m // N_PARTS):
            a = labels[i]
            s = 0.0
            for t in range(d):
                e = np.float64(x[i, t]) - np.float64(c[a, t])
                s += e * e
            tot += s
        parts[part] = tot
    total = 0.0
    for part in range(N_PARTS):
        total += parts[part]
    return total


@njit(parallel=True, cache=True, nogil=True)
def bin_digits(z, boundaries, out):
    """out[i, j] = the number of ``boundaries[j]`` (sorted) <= z[i, j], as
    ``np.searchsorted(boundaries[j], z[:, j], side="right")`` gives (NaN counts past every
    boundary, as numpy sorts it last). ``z`` ``(n, dims)``, ``boundaries`` ``(dims, levels - 1)``."""
    n, f = z.shape
    nb = boundaries.shape[1]
    for i in prange(n):
        for j in range(f):
            v = z[i, j]
            lo, hi = 0, nb                  # first boundary > v, by bisection (NaN: none)
            while lo < hi:
                mid = (lo + hi) // 2
                if v < boundaries[j, mid]:
                    hi = mid
                else:
                    lo = mid + 1
            out[i, j] = lo


@njit(parallel=True, cache=True, nogil=True)
def take_rows(x, rows, out):
    """out[i] = x[rows[i]] for ``x`` ``(n, d)``: numpy's fancy index on threads (a 500k-row sample
    of a 10M x 128 array is bound by memory latency: 0.5 s on one thread)."""
    d = x.shape[1]
    for i in prange(rows.shape[0]):
        r = rows[i]
        for t in range(d):
            out[i, t] = x[r, t]


@njit(parallel=True, cache=True, nogil=True)
def cell_priority(z, digits, centers, out):
    """out[i] = sum_j (z[i, j] - centers[j, digits[i, j]])^2 in float32, j in order: how far a row
    lies from its FSQ cell's centre (``z`` ``(n, f)``, ``digits`` ``(n, f)``, ``centers``
    ``(f, levels)``), as numpy's ``((z - centers[j, digits]) ** 2).sum(1)`` gives it for f < 8
    (numpy sums 8 terms or more pairwise: callers keep numpy there)."""
    f = z.shape[1]
    for i in prange(z.shape[0]):
        s = np.float32(0.0)
        for j in range(f):
            e = z[i, j] - centers[j, digits[i, j]]
            s += e * e
        out[i] = s


@njit(cache=True, nogil=True)
def count_closer(g, vn, qn, own, self_col, lo, beaten):
    """Decode HR's scan of one block of catalog rows ``lo .. lo + m``: beaten[i] += the number of
    rows j (not query i's own item, ``self_col[i]``) with ||v_j||^2 - 2 g[i, j] + ||q_i||^2 <= own[i].
    ``g`` ``(nq, m)`` = decodings x rows^T, ``vn`` ``(m,)``, ``qn`` and ``own`` ``(nq,)``, all float32
    and combined in this order, as numpy's ``vn[None, :] - 2 * g + qn[:, None]`` does (same counts).
    One pass over ``g`` per block where numpy's expression made five (n x queries temporaries)."""
    nq, m = g.shape
    two = np.float32(2.0)
    for i in range(nq):
        qi, oi = qn[i], own[i]
        gi = g[i]
        c = 0
        for j in range(m):
            c += (vn[j] - two * gi[j]) + qi <= oi
        s = self_col[i] - lo
        if 0 <= s < m and (vn[s] - two * gi[s]) + qi <= oi:
            c -= 1
        beaten[i] += c
    return beaten


@njit(cache=True, nogil=True)
def _n_digits(v):
    d = 1
    while v >= 10:
        v //= 10
        d += 1
    return d


@njit(cache=True, nogil=True)
def _put_int(data, at, v, width):
    for t in range(width - 1, -1, -1):
        data[at + t] = 48 + v % 10
        v //= 10
    return at + width


@njit(parallel=True, cache=True, nogil=True)
def sid_utf8(c1, c2, c3, suffix):
    """The Arrow string buffers of ``"c1-c2-c3"`` (``"-suffix"`` appended where suffix > 0) for
    non-negative codes ``(n,)``: (offsets ``(n + 1,)`` int64, utf8 bytes). Lengths, then digits,
    each pass on threads (rows are independent once the offsets are known), where Arrow's
    cast-and-join took 2.6 s at 10M items."""
    n = c1.shape[0]
    offsets = np.empty(n + 1, np.int64)
    offsets[0] = 0
    for i in prange(n):
        w = _n_digits(c1[i]) + _n_digits(c2[i]) + _n_digits(c3[i]) + 2
        if suffix[i] > 0:
            w += _n_digits(suffix[i]) + 1
        offsets[i + 1] = w
    for i in range(n):
        offsets[i + 1] += offsets[i]
    data = np.empty(offsets[n], np.uint8)
    for i in prange(n):
        at = _put_int(data, offsets[i], c1[i], _n_digits(c1[i]))
        data[at] = 45                                   # "-"
        at = _put_int(data, at + 1, c2[i], _n_digits(c2[i]))
        data[at] = 45
        at = _put_int(data, at + 1, c3[i], _n_digits(c3[i]))
        if suffix[i] > 0:
            data[at] = 45
            _put_int(data, at + 1, suffix[i], _n_digits(suffix[i]))
    return offsets, data


@njit(cache=True, nogil=True)
def _move_table(z, digits, lo_b, hi_b, levels, single_cost, single_delta, cost_tmp, delta_tmp):
    """One row's candidate moves to other FSQ cells, unsorted: a move shifts one coordinate, or two
    distinct ones, by one bin, and costs how far the coordinate lies from the boundary it crosses
    (inf: no such bin). Fills ``cost_tmp`` / ``delta_tmp`` (packed-code offsets) and returns (the
    row's packed code, the number of moves). Every buffer is the caller's: a 10M-item snapshot
    calls this for millions of rows."""
    f = z.shape[0]
    base = 0
    w = 1
    for j in range(f):
        base += digits[j] * w
        w *= levels
    n_single = 2 * f
    w = 1
    for j in range(f):
        dj = digits[j]
        # float32 like the reference: the same tie order
        single_cost[j] = z[j] - lo_b[j, dj] if dj > 0 else np.float32(np.inf)
        single_cost[f + j] = hi_b[j, dj] - z[j] if dj < levels - 1 else np.float32(np.inf)
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
            if b != a + f:              # two distinct coordinates (a % f != b % f, without a division)
                cost_tmp[nm] = single_cost[a] + single_cost[b]
                delta_tmp[nm] = single_delta[a] + single_delta[b]
                nm += 1
    return base, nm


@njit(cache=True, nogil=True)
def _order_moves(base, nm, n_alt, cost_tmp, delta_tmp, rank_tmp, out_code):
    """``out_code`` ``(n_alt,)``: the packed codes of the cheapest moves of ``_move_table``, cheapest
    first, ties in move order (as ``fsq.alternatives``' stable argsort), -1 for none."""
    for q in range(nm):                 # stable insertion sort of a few dozen moves, inf last
        t = q
        while t > 0 and cost_tmp[rank_tmp[t - 1]] > cost_tmp[q]:
            rank_tmp[t] = rank_tmp[t - 1]
            t -= 1
        rank_tmp[t] = q
    for q in range(n_alt):
        out_code[q] = -1
        if q < nm:
            o = rank_tmp[q]
            if np.isfinite(cost_tmp[o]):
                out_code[q] = base + delta_tmp[o]


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


@njit(cache=True, nogil=True)
def group_by_cell(cells, n_cells):
    """Counting sort: (cell_ptr ``(n_cells + 1,)``, order ``(m,)``) with ``order`` the positions of
    ``cells`` ``(m,)`` (values in [0, n_cells)) grouped by cell, in position order within a cell.
    O(m + n_cells), where a comparison sort of 10M keys took seconds."""
    m = cells.shape[0]
    cell_ptr = np.zeros(n_cells + 1, np.int64)
    for i in range(m):
        cell_ptr[cells[i] + 1] += 1
    for c in range(n_cells):
        cell_ptr[c + 1] += cell_ptr[c]
    fill = cell_ptr[:-1].copy()
    order = np.empty(m, np.int64)
    for i in range(m):
        c = cells[i]
        order[fill[c]] = i
        fill[c] += 1
    return cell_ptr, order


@njit(parallel=True, cache=True, nogil=True)
def resolve_cells(cell_ptr, order, c3, priority, pbits, is_outside, z, digits, lo_b, hi_b, levels, code_space,
                  n_alt, new_c3, suffix, moved):
    """Collision resolution, one (c1, c2) cell at a time (cells are independent: a move changes c3
    only).

    ``order`` lists rows grouped by cell (``cell_ptr`` delimits the cells), in row order within a
    cell; each cell is sorted here by (c3, ``priority``, row). Rows with ``is_outside`` set hold
    their c3 as a fixed, already-occupied code (e.g. SIDs carried over from the last snapshot)
    and take no part otherwise. Of the other rows, the first holder of each free raw code keeps
    it; every later holder is a mover. In round r every still-pending mover, in order, takes its
    r-th alternative cell if that code is free (codes taken earlier in the round count as taken);
    movers left after n_alt rounds get a dedup suffix numbered within their code. A cell whose
    ``code_space`` codes are all taken has nowhere to move to: its movers go straight to the
    suffixes (on a dense 10M-item snapshot most cells are full). Equals the vectorised reference
    ``sid.resolve_collisions`` row for row. ``pbits``: ``priority``'s float32 bits as uint32
    (empty: priorities of another type, sorted in two passes).
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
        # (c3, priority, row): the cell's rows arrive in row order; one stable sort of one int64
        # key (c3 above the priority's order-preserving bits) where every c3 fits in 31 bits and
        # no priority is NaN, else two stable passes (priority, then c3)
        rows = order[lo:hi].copy()
        packed = np.empty(size, np.int64)
        fits = pbits.shape[0] > 0
        for q in range(size if fits else 0):
            r = rows[q]
            v = c3[r]
            p = priority[r]
            if v < 0 or v >= 2147483648 or p != p:
                fits = False
                break
            b = np.int64(pbits[r])
            if b == 2147483648:             # -0.0 sorts with +0.0, as a float comparison has it
                b = 0
            b = (4294967295 - b) if b >= 2147483648 else (b + 2147483648)
            packed[q] = (v << 32) | b
        if fits:
            rows = rows[np.argsort(packed, kind="mergesort")]
        else:
            rows = rows[np.argsort(priority[rows], kind="mergesort")]
            rows = rows[np.argsort(c3[rows], kind="mergesort")]
        # Taken codes: a bitmap over the code space where it is small (an O(1) test; a 10M-item
        # snapshot makes ~300M tests), else a sorted array searched by bisection.
        use_map = code_space <= 65536
        taken = np.zeros(code_space if use_map else 1, np.bool_)
        occ = np.empty(1 if use_map else 2 * size + 1, np.int64)   # distinct raw codes + one per mover
        n_occ = 0
        n_free_taken = 0                    # taken codes of the space (a held code may lie outside it)
        # codes held from outside, then every raw code of the rest
        outside = np.empty(size, np.int64)
        n_out = 0
        for q in range(size):
            r = rows[q]
            if is_outside[r]:
                outside[n_out] = c3[r]
                n_out += 1
        outside = np.sort(outside[:n_out])
        for q in range(size):
            v = c3[rows[q]]
            if use_map:
                if 0 <= v < code_space and not taken[v]:
                    taken[v] = True
                    n_free_taken += 1
            elif _find(occ, n_occ, v) < 0:
                n_occ = _insert(occ, n_occ, v)
                if 0 <= v < code_space:
                    n_free_taken += 1
        movers = np.empty(size, np.int64)
        n_mov = 0
        prev = np.int64(-1)
        first = True
        for q in range(size):
            r = rows[q]
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
        pending = np.ones(n_mov, np.bool_)
        n_pending = n_mov
        if n_free_taken < code_space:
            # A mover none of whose moves is free now never moves (taken codes stay taken): it goes
            # to the suffixes without ranking its moves or taking part in the rounds. On a dense
            # snapshot that is most movers.
            alt = np.empty((n_mov, n_alt), np.int64)
            live = np.empty(n_mov, np.int64)
            n_live = 0
            single_cost = np.empty(2 * f, np.float32)
            single_delta = np.empty(2 * f, np.int64)
            cost_tmp = np.empty(n_moves, np.float32)
            delta_tmp = np.empty(n_moves, np.int64)
            rank_tmp = np.empty(n_moves, np.int64)
            for m in range(n_mov):
                r = movers[m]
                base, nm = _move_table(z[r], digits[r], lo_b, hi_b, levels, single_cost, single_delta,
                                       cost_tmp, delta_tmp)
                free = False
                for q in range(nm):
                    if np.isfinite(cost_tmp[q]):
                        v = base + delta_tmp[q]
                        if (not taken[v]) if use_map else _find(occ, n_occ, v) < 0:
                            free = True
                            break
                if free:
                    _order_moves(base, nm, n_alt, cost_tmp, delta_tmp, rank_tmp, alt[n_live])
                    live[n_live] = m
                    n_live += 1
            for rnd in range(n_alt):
                if n_pending == 0 or n_free_taken >= code_space:
                    break
                for li in range(n_live):
                    m = live[li]
                    if not pending[m]:
                        continue
                    cand = alt[li, rnd]         # a code of the space, or -1
                    if cand < 0:
                        continue
                    if use_map:
                        if taken[cand]:
                            continue
                        taken[cand] = True
                    elif _find(occ, n_occ, cand) >= 0:
                        continue
                    else:
                        n_occ = _insert(occ, n_occ, cand)
                    n_free_taken += 1
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
