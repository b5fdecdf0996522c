"""Code-quality metrics: collision, EdgeNum, HR@k, utilisation, entropy, churn."""

from __future__ import annotations

from typing import Callable

import numpy as np

from qarm_core.arrays import has_duplicates
from qarm_core.progress import Progress, advance
from qarm_core.quantize.kmeans import STAGE, _k, run_on_threads, threads


def _small_key_space(keys: np.ndarray) -> bool:
    """Whether ``keys`` ``(n,)`` are non-negative integers below max(4n, 2^20): then a table over the
    key space (bincount, lookup) costs one pass where sorting 10M keys took seconds."""
    n = len(keys)
    return bool(n and keys.dtype.kind in "iu" and int(keys.min()) >= 0 and int(keys.max()) < max(4 * n, 1 << 20))


def _key_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(count of each used key ``(used,)``, each row's key count ``(n,)``) for keys ``(n,)``.
    Keys of a small space (every SID key of a default codebook: 2^24) are counted with one
    bincount; others by sorting (np.unique), which took 1.3-2 s per call at 10M rows."""
    if _small_key_space(keys):
        counts = np.bincount(keys)
        return counts[counts > 0], counts[keys]
    _, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return counts, counts[inv]


def collision_metrics(keys: np.ndarray) -> dict[str, float]:
    """keys ``(n,)``: one id per SID. collision_rate = share of items whose SID is shared;
    one_minus_unique = 1 - unique/N; edge_num = mean items per used SID."""
    n = len(keys)
    if not n:
        return {"collision_rate": 0.0, "one_minus_unique": 0.0, "edge_num": 0.0, "max_items_per_sid": 0.0}
    counts, per_row = _key_counts(keys)
    return {"collision_rate": float((per_row > 1).mean()),
            "one_minus_unique": 1.0 - len(counts) / n,
            "edge_num": n / len(counts),
            "max_items_per_sid": float(counts.max())}


def _rows_in(keys: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows ``(m,)`` of ``keys`` ``(n,)`` whose key is in the sorted unique ``wanted``, the index
    of that key in ``wanted`` ``(m,)``). A lookup table over a small non-negative key space (one
    pass), else a binary search per row."""
    if _small_key_space(keys):
        lut = np.full(int(keys.max()) + 1, -1, np.int64)
        inside = wanted[wanted <= keys.max()]
        lut[inside] = np.arange(len(inside))
        at = lut[keys]
        rows = np.flatnonzero(at >= 0)
        return rows, at[rows]
    at = np.minimum(np.searchsorted(wanted, keys), len(wanted) - 1)
    rows = np.flatnonzero(wanted[at] == keys)
    return rows, at[rows]


def hit_rates(x: np.ndarray, keys: np.ndarray, ks: tuple[int, ...] = (1, 10), max_group: int = 2048,
              sample: int | None = None, seed: int = 0,
              add: "tuple[tuple[np.ndarray, np.ndarray], ...]" = ()) -> dict[str, float]:
    """HR@k as the issue defines it: look up an item's SID, rank the items holding it by inner
    product with the item; a hit if the item is within the first k. Ties count against the item
    (rank = 1 + number of other holders scoring >= its own score), so exact duplicates are misses.

    Caveat, measured and proved: for unit-norm embeddings x.y <= x.x = 1 (Cauchy-Schwarz), so the
    item always ranks first unless another holder is a (numerical) duplicate: HR@1 is ~1.0 whatever
    the codes. ``decode_hit_rates`` is the informative variant.

    x ``(n, dim)``; keys ``(n,)``; ``add``: up to two (table ``(K, dim)``, labels ``(n,)``) pairs
    whose rows are added to x's, in order, in float32: item r is x[r] + table[labels[r]] + ...
    (the quantizer passes its residual buffer and the level centroids). ``sample`` bounds the
    number of query items (a seeded sample); only the groups holding a query are read, each
    member once for all of its group's queries, in row order, by one compiled kernel (a Python
    loop per group and its (rows, dim) copies took 5 s of a 10M-item stage for 20,000 queries). Groups larger than
    ``max_group`` are scored on a seeded sample of ``max_group`` members (documented
    approximation for degenerate codes).
    """
    if len(add) > 2:
        raise ValueError(f"hit_rates adds at most two tables, got {len(add)}")
    n = len(keys)
    if len(x) != n:
        raise ValueError(f"hit_rates: {len(x)} rows for {n} keys")
    for j, (table, labels) in enumerate(add):     # the kernel reads without bounds checks
        if len(labels) != n or table.ndim != 2 or table.shape[1] != x.shape[1]:
            raise ValueError(f"hit_rates: table {j} is {table.shape} with {len(labels)} labels, for {n} rows "
                             f"of width {x.shape[1]}")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= len(table)):
            raise ValueError(f"hit_rates: labels of table {j} outside 0..{len(table) - 1}")
    rng = np.random.default_rng(seed)
    q = np.arange(n) if sample is None or n <= sample else np.sort(rng.choice(n, sample, replace=False))
    if not len(q):
        return {f"hr@{k}": 0.0 for k in ks}

    group_keys, q_group = np.unique(keys[q], return_inverse=True)          # the queried groups
    members, member_group = _rows_in(keys, group_keys)                     # their rows, in row order
    sizes = np.bincount(member_group, minlength=len(group_keys))
    big = np.flatnonzero(sizes > max_group)
    if len(big):                                    # seeded member samples, drawn in group order
        m_ptr, m_pos = _k().group_by_cell(member_group, len(group_keys))   # counting sort, row order kept
        keep = np.ones(len(members), bool)
        for g in big:
            chosen = np.zeros(sizes[g], bool)
            chosen[rng.choice(sizes[g], max_group, replace=False)] = True
            keep[m_pos[m_ptr[g]:m_ptr[g + 1]][~chosen]] = False
        members, member_group = members[keep], member_group[keep]
        del m_ptr, m_pos, keep
    q_ptr, q_order = _k().group_by_cell(q_group.astype(np.int64), len(group_keys))
    x = np.ascontiguousarray(x, dtype=np.float32)
    zero_table = (np.zeros((1, x.shape[1]), np.float32), np.zeros(1, np.int32))
    (t0, l0), (t1, l1) = (tuple(add) + (zero_table, zero_table))[:2]
    # plain rows: a one-row zero table, every row labelled 0 (an (n,) array only while this runs)
    l0 = np.zeros(n, np.int32) if l0 is zero_table[1] else l0
    l1 = np.zeros(n, np.int32) if l1 is zero_table[1] else l1
    ranks_q = np.empty(len(q), np.int64)                                   # in q_order
    _k().rank_in_groups(x, np.ascontiguousarray(t0, np.float32), l0, np.ascontiguousarray(t1, np.float32), l1,
                        members, member_group, q[q_order], q_ptr, ranks_q)
    ranks = np.empty(len(q), np.int64)
    ranks[q_order] = ranks_q
    return {f"hr@{k}": float((ranks <= k).mean()) for k in ks}


def decode_hit_rates(x: "np.ndarray | Callable[[slice], np.ndarray]", n: int,
                     decoders: "dict[str, Callable[[np.ndarray], np.ndarray]]", ks: tuple[int, ...] = (1, 10),
                     sample: int | None = 1000, seed: int = 0, chunk: int | None = None) -> dict[str, float]:
    """Decode HR@k: decode the item's SID to a vector (the sum of its codewords) and search the
    whole catalog by squared L2 distance to it; a hit if the item is among the k nearest (ties
    count against it). An item can only be first if its SID is its own (holders of one SID share
    one decoding) and the decoding lies closer to it than to any other item, so this measures both
    collisions and how precisely a SID pins its item down.

    x ``(n, dim)`` or a function giving a block of rows for a slice; decoders: name -> a function
    giving the decoded vectors ``(m, dim)`` of items ``(m,)`` (several codes share one scan of the
    catalog). Returns ``{name}.decode_hr@{k}``. Cost: sample x n x dim multiply-adds per decoder (sgemm).
    ``chunk``: catalog rows per block (default: about 4 MB of scores per thread).
    """
    rng = np.random.default_rng(seed)
    q = np.arange(n) if sample is None or n <= sample else np.sort(rng.choice(n, sample, replace=False))
    nq = len(q)
    xq = np.concatenate([np.asarray(x(slice(int(i), int(i) + 1)) if callable(x) else x[i:i + 1], np.float32)
                         for i in q]) if nq else np.zeros((0, 1), np.float32)
    dq = np.concatenate([np.asarray(dec(q), np.float32) for dec in decoders.values()])    # (m * nq, dim)
    own = ((np.tile(xq, (len(decoders), 1)).astype(np.float64) - dq) ** 2).sum(1)          # to the item itself
    dqn = (dq.astype(np.float64) ** 2).sum(1).astype(np.float32)
    self_col = np.tile(q, len(decoders)).astype(np.int64)
    # 10M items x 2,000 decodings: ~20 s, so progress lines (quiet: none for a short scan)
    with Progress(STAGE, f"decode HR@k: {len(dq):,} decodings scanning the catalog", n, "rows", quiet=True) as prog:
        beaten = _scan_catalog(x, n, dq, dqn, own.astype(np.float32), self_col, chunk, prog)
    out = {}
    for j, name in enumerate(decoders):
        b = beaten[j * nq:(j + 1) * nq]
        out |= {f"{name}.decode_hr@{k}": float((b + 1 <= k).mean()) if nq else 0.0 for k in ks}
    return out


def _scan_catalog(x: "np.ndarray | Callable[[slice], np.ndarray]", n: int, dq: np.ndarray, dqn: np.ndarray,
                  own: np.ndarray, self_col: np.ndarray, chunk: int | None, progress: Progress | None = None
                  ) -> np.ndarray:
    """``(nq,)`` int64: for each decoding ``dq[i]`` ``(nq, dim)``, the catalog rows other than
    ``self_col[i]`` at squared distance <= ``own[i]`` (float32, as ``count_closer`` computes it).
    Blocks of rows go to one Python thread per CPU, each running a single-threaded sgemm and the
    compiled count (both release the GIL), as a k-means pass does; the counts are integers, so
    the result does not depend on the thread count."""
    kk = _k()
    nq = len(dq)
    rows = chunk or max(256, min(16_384, (1 << 20) // max(nq, 1)))
    blocks = -(-n // rows)
    t = max(1, min(threads(), blocks))
    parts = np.zeros((t, nq), np.int64)

    def work(owner: int) -> None:
        gbuf = np.empty(nq * rows, np.float32)
        for b in range(owner, blocks, t):
            lo, hi = b * rows, min(n, (b + 1) * rows)
            v = np.ascontiguousarray(x(slice(lo, hi)) if callable(x) else x[lo:hi], dtype=np.float32)
            g = gbuf[:nq * (hi - lo)].reshape(nq, hi - lo)
            np.matmul(dq, v.T, out=g)                                          # (queries, rows)
            kk.count_closer(g, (v * v).sum(1), dqn, own, self_col, lo, parts[owner])
            advance(progress, hi - lo)

    run_on_threads(work, t)
    return parts.sum(0)


def level_usage(codes: np.ndarray, space: int) -> dict[str, float]:
    """Utilisation (used codes / space) and normalised entropy of one level's codes ``(n,)``."""
    counts = np.bincount(codes.astype(np.int64), minlength=space) if space <= 50_000_000 else \
        np.unique(codes, return_counts=True)[1]
    used = counts[counts > 0]
    p = used / used.sum()
    ent = float(-(p * np.log(p)).sum())
    return {"utilisation": len(used) / space, "entropy": ent / np.log(space) if space > 1 else 0.0}


def churn(prev_ids: np.ndarray, prev_sids: np.ndarray, ids: np.ndarray, sids: np.ndarray) -> dict[str, float]:
    """Share of items present in both snapshots whose SID changed. Ids are unique within each
    snapshot (checked: by one pass where they are sorted), which spares numpy's intersection two
    uniques (3.2 -> 0.5 s on 10M sorted ids here)."""
    if has_duplicates(prev_ids) or has_duplicates(ids):
        raise ValueError("churn: item ids repeat within a snapshot")
    common, a, b = np.intersect1d(prev_ids, ids, assume_unique=True, return_indices=True)
    if len(common) == 0:
        return {"churn": 0.0, "churn_items": 0.0}
    return {"churn": float((prev_sids[a] != sids[b]).mean()), "churn_items": float(len(common))}
