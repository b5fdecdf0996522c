"""Code-quality metrics: collision, EdgeNum, HR@k, utilisation, entropy, churn."""

from __future__ import annotations

from typing import Callable

import numpy as np


def collision_metrics(keys: np.ndarray) -> dict[str, float]:
    """keys ``(n,)``: one id per SID. collision_rate = share of items whose SID is shared;
    one_minus_unique = 1 - unique/N; edge_num = mean items per used SID."""
    n = len(keys)
    _, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return {"collision_rate": float((counts[inv] > 1).mean()) if n else 0.0,
            "one_minus_unique": 1.0 - len(counts) / n if n else 0.0,
            "edge_num": n / len(counts) if n else 0.0,
            "max_items_per_sid": float(counts.max()) if n else 0.0}


def hit_rates(x: "np.ndarray | Callable[[np.ndarray], np.ndarray]", keys: np.ndarray, ks: tuple[int, ...] = (1, 10),
              max_group: int = 2048, sample: int | None = None, seed: int = 0) -> dict[str, float]:
    """HR@k as the issue defines it: look up an item's SID, rank the items holding it by inner
    product with the item; a hit if the item is within the first k. Ties count against the item
    (rank = 1 + number of other holders scoring >= its own score), so exact duplicates are misses.

    Caveat, measured and proved: for unit-norm embeddings x.y <= x.x = 1 (Cauchy-Schwarz), so the
    item always ranks first unless another holder is a (numerical) duplicate: HR@1 is ~1.0 whatever
    the codes. ``decode_hit_rates`` is the informative variant.

    x ``(n, dim)``, or a function returning the rows for an index array; keys ``(n,)``. ``sample``
    bounds the number of query items (a seeded sample); only the groups holding a query are scored.
    Groups larger than ``max_group`` are scored on the query plus ``max_group - 1`` other members
    drawn by a seeded shuffle (documented approximation for degenerate codes).
    """
    n = len(keys)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(n), keys))
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    sizes = np.diff(np.r_[starts, n])
    del sk
    q = np.arange(n) if sample is None or n <= sample else np.sort(rng.choice(n, sample, replace=False))
    pos = np.empty(n, np.int64)
    pos[order] = np.arange(n)
    grp = np.searchsorted(starts, pos[q], side="right") - 1          # each query's group
    del pos
    ranks = np.ones(len(q), np.int64)                               # singleton groups: rank 1
    qsize = sizes[grp]
    for size in np.unique(qsize[qsize > 1]):
        sel = np.flatnonzero(qsize == size)
        s = int(min(size, max_group))
        step = max(1, 262_144 // s)               # queries per batch: bounded (rows, dim) temporaries
        for lo in range(0, len(sel), step):
            qi = sel[lo:lo + step]
            members = order[starts[grp[qi]][:, None] + np.arange(s)[None, :]]   # (queries, s)
            v = x(members.reshape(-1)) if callable(x) else x[members.reshape(-1)]
            v = v.reshape(len(qi), s, -1)
            qv = x(q[qi]) if callable(x) else x[q[qi]]                           # (queries, dim)
            own = np.einsum("qd,qd->q", qv, qv)[:, None]
            sims = np.einsum("qsd,qd->qs", v, qv)
            ranks[qi] = 1 + ((sims >= own) & (members != q[qi, None])).sum(1)
    return {f"hr@{k}": float((ranks <= k).mean()) if len(q) else 0.0 for k in ks}


def decode_hit_rates(x: "np.ndarray | Callable[[slice], np.ndarray]", n: int,
                     decoders: "dict[str, Callable[[np.ndarray], np.ndarray]]", ks: tuple[int, ...] = (1, 10),
                     sample: int | None = 1000, seed: int = 0, chunk: int = 16_384) -> dict[str, float]:
    """Decode HR@k: decode the item's SID to a vector (the sum of its codewords) and search the
    whole catalog by squared L2 distance to it; a hit if the item is among the k nearest (ties
    count against it). An item can only be first if its SID is its own (holders of one SID share
    one decoding) and the decoding lies closer to it than to any other item, so this measures both
    collisions and how precisely a SID pins its item down.

    x ``(n, dim)`` or a function giving a block of rows for a slice; decoders: name -> a function
    giving the decoded vectors ``(m, dim)`` of items ``(m,)`` (several codes share one scan of the
    catalog). Returns ``{name}.decode_hr@{k}``. Cost: sample x n x dim multiply-adds per decoder (sgemm).
    """
    rng = np.random.default_rng(seed)
    q = np.arange(n) if sample is None or n <= sample else np.sort(rng.choice(n, sample, replace=False))
    nq = len(q)
    xq = np.concatenate([np.asarray(x(slice(int(i), int(i) + 1)) if callable(x) else x[i:i + 1], np.float32)
                         for i in q]) if nq else np.zeros((0, 1), np.float32)
    dq = np.concatenate([np.asarray(dec(q), np.float32) for dec in decoders.values()])    # (m * nq, dim)
    own = ((np.tile(xq, (len(decoders), 1)).astype(np.float64) - dq) ** 2).sum(1)          # to the item itself
    dqn = (dq.astype(np.float64) ** 2).sum(1).astype(np.float32)
    self_col = np.tile(q, len(decoders))
    beaten = np.zeros(len(dq), np.int64)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        v = np.ascontiguousarray(x(slice(lo, hi)) if callable(x) else x[lo:hi], dtype=np.float32)
        d = (v * v).sum(1)[None, :] - 2.0 * (dq @ v.T) + dqn[:, None]                     # (queries, rows)
        better = d <= own[:, None].astype(np.float32)
        inside = np.flatnonzero((self_col >= lo) & (self_col < hi))
        better[inside, self_col[inside] - lo] = False                  # the item itself
        beaten += better.sum(1)
    out = {}
    for j, name in enumerate(decoders):
        b = beaten[j * nq:(j + 1) * nq]
        out |= {f"{name}.decode_hr@{k}": float((b + 1 <= k).mean()) if nq else 0.0 for k in ks}
    return out


def level_usage(codes: np.ndarray, space: int) -> dict[str, float]:
    """Utilisation (used codes / space) and normalised entropy of one level's codes ``(n,)``."""
    counts = np.bincount(codes.astype(np.int64), minlength=space) if space <= 50_000_000 else \
        np.unique(codes, return_counts=True)[1]
    used = counts[counts > 0]
    p = used / used.sum()
    ent = float(-(p * np.log(p)).sum())
    return {"utilisation": len(used) / space, "entropy": ent / np.log(space) if space > 1 else 0.0}


def churn(prev_ids: np.ndarray, prev_sids: np.ndarray, ids: np.ndarray, sids: np.ndarray) -> dict[str, float]:
    """Share of items present in both snapshots whose SID changed."""
    common, a, b = np.intersect1d(prev_ids, ids, return_indices=True)
    if len(common) == 0:
        return {"churn": 0.0, "churn_items": 0.0}
    return {"churn": float((prev_sids[a] != sids[b]).mean()), "churn_items": float(len(common))}
