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
    """HR@k: look up an item's SID, rank the items holding it by inner product with the item;
    a hit if the item is within the first k. Ties count against the item (rank = 1 + number of
    other holders scoring >= its own score), so exact duplicates are misses.

    x ``(n, dim)``, or a function returning the rows for an index array; keys ``(n,)``. Groups larger than ``max_group`` are scored on their first
    ``max_group`` members by a seeded shuffle (documented approximation for degenerate codes);
    ``sample`` bounds the number of query items.
    """
    n = len(keys)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(n), keys))
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    sizes = np.diff(np.r_[starts, n])
    ranks = np.ones(n, np.int64)                  # singleton groups: rank 1
    queries = np.ones(n, bool)
    for size in np.unique(sizes[sizes > 1]):
        all_g = starts[sizes == size]
        s = int(min(size, max_group))
        step = max(1, 262_144 // s)           # groups per batch: bounded (rows, dim) temporaries
        for lo in range(0, len(all_g), step):
            g = all_g[lo:lo + step]
            members = order[g[:, None] + np.arange(s)[None, :]]             # (groups, s)
            v = x(members) if callable(x) else x[members]                   # (groups, s, dim)
            sims = np.einsum("gsd,gtd->gst", v, v)
            own = np.diagonal(sims, axis1=1, axis2=2)[:, :, None]
            ranks[members] = (sims >= own).sum(2)                           # includes itself
            if size > max_group:
                queries[order[g[:, None] + np.arange(s, size)[None, :]]] = False
    q = np.flatnonzero(queries)
    if sample is not None and len(q) > sample:
        q = rng.choice(q, sample, replace=False)
    return {f"hr@{k}": float((ranks[q] <= k).mean()) for k in ks}


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
