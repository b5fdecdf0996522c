"""Swing item-to-item pairs.

    score(i, j) = sum over unordered user pairs {u, v} with u, v in U_i and both having j of
                  w_u * w_v / (alpha2 + |I_u ∩ I_v|),          w_u = (alpha1 + |I_u|) ** -beta

(the user-weighted form Apache Flink ML uses). U_i is item i's user set, capped at
``max_users_per_item`` by a seeded sample; only users with ``min_user_items..max_user_items``
distinct items take part; each item keeps its ``top_k`` highest-scoring neighbours.

The kernel is compiled with numba and runs items in parallel. For one item i it marks each user
u's items once, then scans every later user v's items against the marks: the work is
sum_i |U_i|^2 / 2 * mean |I_v| memory reads, which the per-item cap bounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from qarm_core.arrays import sorted_unique
from qarm_core.hashing import splitmix64
from qarm_core.pairs.config import SwingConfig

PAIRS_SOURCE = "swing"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwingInputs:
    """CSR views over the filtered, deduplicated log, in dense indices."""

    item_ids: np.ndarray      # (n_items,) original ids of dense items
    user_ptr: np.ndarray      # (n_users + 1,)
    user_items: np.ndarray    # (nnz,) int32 dense item indices, sorted within each user
    item_ptr: np.ndarray      # (n_items + 1,)
    item_users: np.ndarray    # (nnz_capped,) int32 dense user indices, the capped sample per item
    weights: np.ndarray       # (n_users,) w_u


def prepare_swing_inputs(user_id: np.ndarray, item_id: np.ndarray, params: SwingConfig) -> SwingInputs:
    """Deduplicate (user, item), filter users by item count, sample users per item, build CSR."""
    if len(user_id) != len(item_id):
        raise ValueError("swing: user_id and item_id differ in length")
    u_ids, u = np.unique(np.asarray(user_id, dtype=np.int64), return_inverse=True)
    i_ids, i = np.unique(np.asarray(item_id, dtype=np.int64), return_inverse=True)
    pair = sorted_unique(u.astype(np.int64) * len(i_ids) + i)         # distinct (user, item), sorted by user
    u, i = pair // len(i_ids), pair % len(i_ids)

    n_per_user = np.bincount(u, minlength=len(u_ids))
    keep_user = (n_per_user >= params.min_user_items) & (n_per_user <= params.max_user_items)
    keep = keep_user[u]
    u, i = u[keep], i[keep]
    # Re-index the users and items that survive the filter. Items are numbered by descending
    # popularity so that the kernel's random reads of its mark array hit a small, cache-resident
    # region (users' lists are dominated by popular items).
    users_left, u = np.unique(u, return_inverse=True)
    items_left, i = np.unique(i, return_inverse=True)
    popularity = np.bincount(i, minlength=len(items_left))
    by_pop = np.lexsort((i_ids[items_left], -popularity))      # ties by original id
    rank_of = np.empty(len(items_left), np.int64)
    rank_of[by_pop] = np.arange(len(items_left))
    i = rank_of[i]
    item_ids = i_ids[items_left][by_pop]
    n_users, n_items = len(users_left), len(items_left)
    counts = n_per_user[users_left]
    weights = (params.alpha1 + counts.astype(np.float64)) ** -params.beta

    order = np.lexsort((i, u))
    u, i = u[order], i[order]
    user_ptr = np.zeros(n_users + 1, np.int64)
    np.cumsum(np.bincount(u, minlength=n_users), out=user_ptr[1:])
    user_items = i.astype(np.int32)                                # sorted within each user

    # Per-item seeded sample of users: order each item's users by a hash of (seed, item, user),
    # on original ids, so the sample does not depend on which other rows are present.
    seeded = splitmix64(np.full(len(u), params.seed, np.int64)) ^ item_ids[i].astype(np.uint64)
    key = splitmix64(splitmix64(seeded) ^ u_ids[users_left][u].astype(np.uint64))
    order = np.lexsort((key, i))
    i_sorted = i[order]
    starts = np.searchsorted(i_sorted, np.arange(n_items))
    rank = np.arange(len(order)) - starts[i_sorted]
    sel = order[rank < params.max_users_per_item]
    # Within an item, the most active users first: the kernel marks the earlier user's items and
    # scans the later one's, so each user pair costs the shorter of the two lists.
    sel = sel[np.lexsort((u[sel], -counts[u[sel]], i[sel]))]
    item_users = u[sel].astype(np.int32)
    item_ptr = np.zeros(n_items + 1, np.int64)
    np.cumsum(np.bincount(i[sel], minlength=n_items), out=item_ptr[1:])
    return SwingInputs(item_ids, user_ptr, user_items, item_ptr, item_users, weights)


def _kernel():
    """The numba kernel, compiled on first use (and cached on disk by numba)."""
    from numba import njit, prange

    from qarm_core.devices import numba_without_openmp

    numba_without_openmp()

    @njit(parallel=True, cache=True, nogil=True)
    def swing_kernel(item_ptr, item_users, user_ptr, user_items, w, alpha2, top_k, n_chunks):
        n_items = item_ptr.shape[0] - 1
        max_len = 1
        for uu in range(user_ptr.shape[0] - 1):
            max_len = max(max_len, user_ptr[uu + 1] - user_ptr[uu])
        out_dst = np.full((n_items, top_k), -1, np.int64)
        out_score = np.zeros((n_items, top_k), np.float64)
        out_n = np.zeros(n_items, np.int64)
        for c in prange(n_chunks):
            acc = np.zeros(n_items, np.float64)
            mark = np.zeros(n_items, np.int32)
            touched = np.empty(n_items, np.int32)
            buf = np.empty(max_len, np.int32)
            stamp = 0
            # Interleaved items per chunk: popular items are spread over all threads.
            for i in range(c, n_items, n_chunks):
                lo, hi = item_ptr[i], item_ptr[i + 1]
                nt = 0
                for a in range(lo, hi):
                    u = item_users[a]
                    if stamp == 2_000_000_000:  # int32 stamps: restart before they overflow
                        mark[:] = 0
                        stamp = 0
                    stamp += 1
                    for p in range(user_ptr[u], user_ptr[u + 1]):
                        mark[user_items[p]] = stamp
                    for b in range(a + 1, hi):
                        v = item_users[b]
                        nc = 0
                        for p in range(user_ptr[v], user_ptr[v + 1]):
                            j = user_items[p]
                            if mark[j] == stamp:
                                buf[nc] = j
                                nc += 1
                        wt = w[u] * w[v] / (alpha2 + nc)
                        for q in range(nc):
                            j = buf[q]
                            if j != i:
                                if acc[j] == 0.0:
                                    touched[nt] = j
                                    nt += 1
                                acc[j] += wt
                if nt > 0:
                    cand = np.sort(touched[:nt])
                    vals = np.empty(nt, np.float64)
                    for q in range(nt):
                        vals[q] = -acc[cand[q]]
                    order = np.argsort(vals, kind="mergesort")   # stable: ties by item index
                    k = min(top_k, nt)
                    for q in range(k):
                        out_dst[i, q] = cand[order[q]]
                        out_score[i, q] = acc[cand[order[q]]]
                    out_n[i] = k
                    for q in range(nt):
                        acc[touched[q]] = 0.0
        return out_dst, out_score, out_n

    return swing_kernel


_KERNEL = None


def swing_scores(inputs: SwingInputs, params: SwingConfig, n_chunks: int = 64, k: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, score) arrays in original item ids, ``k`` rows per source item at most
    (default ``params.top_k``), sorted by (src, score desc, neighbour popularity desc, dst)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernel()
    k = params.top_k if k is None else k
    n_items = len(inputs.item_ids)
    if n_items == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
    dst, score, n = _KERNEL(inputs.item_ptr, inputs.item_users, inputs.user_ptr, inputs.user_items,
                            inputs.weights, float(params.alpha2), int(k), int(min(n_chunks, n_items)))
    valid = np.arange(k)[None, :] < n[:, None]
    src = inputs.item_ids[np.broadcast_to(np.arange(n_items)[:, None], dst.shape)[valid]]
    dense_dst, score = dst[valid], score[valid]
    dst = inputs.item_ids[dense_dst]
    # ties in the kernel's order (the more popular neighbour first), so that the first k of a
    # deeper list are the k the kernel keeps (SwingConfig.keep_published_depth)
    order = np.lexsort((dense_dst, -score, src))
    return src[order], dst[order], score[order]


def mine_swing_pairs(user_id: np.ndarray, item_id: np.ndarray, params: SwingConfig | None = None,
                     k: int | None = None) -> pa.Table:
    """Swing pairs from interaction arrays ``(n_events,)``: one row per directed neighbour, the ``k``
    best of each source item (default ``params.top_k``).

    Returns a table ``src_item, dst_item, score, source`` sorted by (src_item, score desc), ties by
    the neighbour's popularity (its users after filtering), then dst_item.
    """
    import time

    params = params or SwingConfig()
    t0 = time.perf_counter()
    inputs = prepare_swing_inputs(user_id, item_id, params)
    log.info("swing: inputs ready in %.1f s (%s events); scoring user pairs per item (one compiled pass, "
             "no progress until it ends)", time.perf_counter() - t0, f"{len(user_id):,}")
    t1 = time.perf_counter()
    src, dst, score = swing_scores(inputs, params, k=k)
    log.info("swing: %s pairs in %.1f s", f"{len(src):,}", time.perf_counter() - t1)
    return pairs_table(src, dst, score, PAIRS_SOURCE)


def pairs_table(src: np.ndarray, dst: np.ndarray, score: np.ndarray, source: str) -> pa.Table:
    from qarm_core.schemas import PAIRS

    return pa.table({"src_item": pa.array(src, pa.int64()), "dst_item": pa.array(dst, pa.int64()),
                     "score": pa.array(score, pa.float64()),
                     "source": pa.array(np.full(len(src), source, dtype=object), pa.string())},
                    schema=PAIRS.schema)


def keep_published_neighbours(candidates: pa.Table, published: pa.Table | None, top_k: int
                              ) -> tuple[pa.Table, dict[str, float]]:
    """Each source item's ``top_k`` neighbours from ``candidates`` (one source's rows, each item's
    rows adjacent and best first, as ``mine_swing_pairs`` returns them), preferring the pairs
    ``published`` holds: a published pair among an item's candidates is kept and the newcomers fill
    the places left, best first. The candidates' depth is the rank within which a published pair
    survives (``SwingConfig.keep_published_depth``). Scores are today's; the output has the
    candidates' order. Selecting again with the output as ``published`` returns it unchanged.

    Report: ``kept_published`` (published pairs kept outside today's top_k), ``new`` (pairs not in
    ``published``), ``new_if_fresh`` (pairs of today's plain top_k not in ``published``: what ``new``
    would be without keeping), ``published`` (its pairs of this source), ``dropped`` (published pairs
    not among today's: fallen out of the depth, or their item gone), so that today's pairs number
    ``published - dropped + new``: ``new`` is the table's growth plus what replaced ``dropped``.
    """
    src = candidates["src_item"].to_numpy()
    dst = candidates["dst_item"].to_numpy()
    n = len(src)
    rank = _rank_in_group(src)          # the candidates are sorted: one item's rows are adjacent
    was = _in_pairs(src, dst, published) if published is not None and published.num_rows else np.zeros(n, bool)
    # within an item: published rows first, then by rank; the first top_k survive
    order = np.lexsort((rank, ~was, src))
    keep = np.zeros(n, bool)
    keep[order[_rank_in_group(src[order]) < top_k]] = True
    report = {"kept_published": float((keep & was & (rank >= top_k)).sum()),
              "new": float((keep & ~was).sum()),
              "new_if_fresh": float(((rank < top_k) & ~was).sum()),
              "published": float(published.num_rows if published is not None else 0)}
    report["dropped"] = report["published"] - float((keep & was).sum())
    return candidates.filter(pa.array(keep)), report


def _rank_in_group(groups: np.ndarray) -> np.ndarray:
    """Position of each row within its run of equal values of ``groups`` ``(n,)`` (runs adjacent)."""
    n = len(groups)
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


def _in_pairs(src: np.ndarray, dst: np.ndarray, pairs: pa.Table) -> np.ndarray:
    """Whether each (src[i], dst[i]) is a row of ``pairs`` ``(src_item, dst_item)``."""
    ids, inv = np.unique(np.concatenate([src, dst, pairs["src_item"].to_numpy(), pairs["dst_item"].to_numpy()]),
                         return_inverse=True)
    n, m = len(src), pairs.num_rows
    # dense indices below len(ids) <= 2 * (n + m): their product fits int64 for any catalog
    key = inv[:n] * len(ids) + inv[n:2 * n]
    pkey = inv[2 * n:2 * n + m] * len(ids) + inv[2 * n + m:]
    return np.isin(key, pkey)
