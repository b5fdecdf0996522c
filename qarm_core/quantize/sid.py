"""Semantic IDs (c1, c2, c3) and collision resolution."""

from __future__ import annotations

import numpy as np


def sid_keys(c1: np.ndarray, c2: np.ndarray, c3: np.ndarray, k2: int, c3_space: int) -> np.ndarray:
    """One int64 per (c1, c2, c3) triple (the caller checks k1*k2*c3_space < 2**63)."""
    return (c1.astype(np.int64) * k2 + c2.astype(np.int64)) * c3_space + c3.astype(np.int64)


def resolve_collisions(keys: np.ndarray, priority: np.ndarray, alt_c3: np.ndarray, c3: np.ndarray,
                       c3_space: int, occupied: np.ndarray | None = None,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move colliding items to their next-best free FSQ code; suffix the rest.

    keys ``(n,)``: raw SID keys; priority ``(n,)``: lower keeps the raw code first (e.g. distance
    to the cell centre); alt_c3 ``(n, m)``: alternative c3 codes, best first (-1 = none); c3 ``(n,)``.
    Returns (new c3 ``(n,)``, dedup suffix ``(n,)`` (0 = none), resolved ``(n,)`` bool: the item
    was moved or suffixed). ``occupied``: keys already held by items outside this call (e.g.
    SIDs carried over from the last snapshot); nobody here keeps such a key. Deterministic: ties in
    priority fall back to row order.
    """
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    new_c3 = c3.astype(np.int64).copy()
    new_keys = keys.copy()
    order = np.lexsort((np.arange(n), priority, keys))
    sorted_keys = keys[order]
    first = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    outside = np.zeros(0, np.int64) if occupied is None else np.unique(occupied)
    if len(outside):
        first &= ~np.isin(sorted_keys, outside)
    movers = order[~first]                       # every holder of a taken key but the first
    occupied = np.union1d(np.unique(keys), outside)
    moved = np.zeros(n, bool)
    pending = movers
    for r in range(alt_c3.shape[1]):
        if len(pending) == 0:
            break
        cand_c3 = alt_c3[pending, r]
        cand = keys[pending] - c3[pending] + cand_c3
        ok = cand_c3 >= 0
        ok[ok] = ~np.isin(cand[ok], occupied)
        # Among movers wanting the same free code this round, the first in order takes it.
        idx = np.flatnonzero(ok)
        _, first_idx = np.unique(cand[idx], return_index=True)
        win = idx[np.sort(first_idx)]
        rows = pending[win]
        new_c3[rows] = cand_c3[win]
        new_keys[rows] = cand[win]
        moved[rows] = True
        occupied = np.union1d(occupied, cand[win])
        keep = np.ones(len(pending), bool)
        keep[win] = False
        pending = pending[keep]
    suffix = np.zeros(n, np.int64)
    if len(pending):
        # Last resort: a dedup suffix, numbered within each still-shared key.
        o = np.lexsort((np.arange(len(pending)), priority[pending], new_keys[pending]))
        p = pending[o]
        k = new_keys[p]
        start = np.r_[True, k[1:] != k[:-1]]
        run = np.arange(len(p)) - np.maximum.accumulate(np.where(start, np.arange(len(p)), 0))
        suffix[p] = run + 1
    return new_c3, suffix, moved | (suffix > 0)


def sid_strings(c1: np.ndarray, c2: np.ndarray, c3: np.ndarray, suffix: np.ndarray) -> list[str]:
    return [f"{a}-{b}-{c}" + (f"-{s}" if s else "") for a, b, c, s in zip(c1.tolist(), c2.tolist(),
                                                                         c3.tolist(), suffix.tolist())]
