"""General Search Unit: pick the top-k items of a long history for each (user, target).

Histories are dense item indices ``(B, L)`` with 0 as padding (``qarm_core.rank.inputs.ItemIndex``),
right-aligned: the most recent event is in the last column. Three searches:

* ``soft_topk``: the k history items with the largest inner product ``<e_h, e_t>`` between their
  embedding and the target's (QARM V2 GSU over PCA-reduced LLM embeddings; SIM-soft with learned
  ID embeddings);
* ``hard_topk``: the k most recent history items whose category equals the target's (SIM-hard; the
  category is the c1 code or the first tag);
* ``search_samples``: either search for every sample of a log, chunk by chunk, so that 1M users x
  1,000-item histories never materialise more than ``chunk_rows x L x d`` floats at once.

Fewer than k valid history items: the result is padded with index 0 (masked downstream).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

NEG_INF = float("-inf")


def history_window(seq_flat: np.ndarray, starts: np.ndarray, pos: np.ndarray, length: int) -> np.ndarray:
    """The ``length`` events before ``pos`` of each row, right-aligned and 0-padded: ``(B, length)``.

    ``seq_flat`` ``(E,)`` holds every user's ordered item indices back to back, ``starts`` ``(B,)``
    where each row's user begins in it, ``pos`` ``(B,)`` how many of that user's events come before
    the target.
    """
    offs = pos[:, None].astype(np.int64) - length + np.arange(length, dtype=np.int64)[None, :]
    valid = offs >= 0
    at = starts[:, None].astype(np.int64) + np.where(valid, offs, 0)
    return np.where(valid, seq_flat[at], 0)


def soft_topk(target_vec: torch.Tensor, hist: torch.Tensor, item_vecs: torch.Tensor, k: int,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner-product top-k of each row's history.

    target_vec ``(B, d)``; hist ``(B, L)`` item indices, 0 = padding; item_vecs ``(N + 1, d)``.
    Returns (items ``(B, k')``, scores ``(B, k')``) with ``k' = min(k, L)``, best first; positions
    beyond a row's valid history hold item 0 and score -inf. Ties go to the more recent event.
    """
    k = min(k, hist.shape[1])
    # index_select on the flat index: ~2.5x faster than advanced indexing item_vecs[hist] on CPU.
    h = item_vecs.index_select(0, hist.reshape(-1)).view(*hist.shape, -1)   # (B, L, d)
    s = torch.bmm(h, target_vec.unsqueeze(-1)).squeeze(-1)           # (B, L)
    # Reversed inside so that, among equal scores, topk's first pick is the most recent position.
    return _topk_of_scores(s, hist, k)


def soft_topk_by_index(target: torch.Tensor, hist: torch.Tensor, item_vecs: torch.Tensor, k: int,
                       table_budget_bytes: int = 256 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """``soft_topk`` for target item indices ``(B,)``, by the cheaper exact route: when the distinct
    targets times the catalog fit in ``table_budget_bytes``, score those targets against every item
    once (``(U, N + 1)``, one GEMM) and gather the history's scores ``(B, L)``; otherwise gather the
    history's vectors ``(B, L, d)`` and multiply."""
    uniq, inv = torch.unique(target, return_inverse=True)
    if len(uniq) * item_vecs.shape[0] * 4 <= table_budget_bytes:
        table = item_vecs[uniq] @ item_vecs.T                            # (U, N + 1)
        return _topk_of_scores(table[inv.unsqueeze(1), hist], hist, k)
    return soft_topk(item_vecs[target], hist, item_vecs, k)


def hard_topk(target_cat: torch.Tensor, hist: torch.Tensor, item_cat: torch.Tensor, k: int) -> torch.Tensor:
    """The k most recent history items of the target's category: items ``(B, k')``, most recent
    first, 0-padded. target_cat ``(B,)``, hist ``(B, L)``, item_cat ``(N + 1,)`` with 0 = no category
    (never matches)."""
    k = min(k, hist.shape[1])
    match = (item_cat[hist] == target_cat[:, None]) & (hist > 0) & (target_cat[:, None] > 0)
    recency = torch.arange(hist.shape[1], device=hist.device, dtype=torch.float32).expand_as(hist)
    s = torch.where(match, recency, torch.full_like(recency, -1.0))
    top_s, top_i = torch.topk(s, k, dim=1)
    return hist.gather(1, top_i).masked_fill(top_s < 0, 0)


def brute_force_topk(target_vec: np.ndarray, hist: np.ndarray, item_vecs: np.ndarray, k: int) -> list[list[int]]:
    """Reference for tests: per row, a plain sort of the valid history by score (recency breaks ties)."""
    out = []
    for t, row in zip(target_vec, hist):
        cand = [(float(item_vecs[i] @ t), j, int(i)) for j, i in enumerate(row) if i > 0]
        cand.sort(key=lambda c: (-c[0], -c[1]))
        out.append([i for _, _, i in cand[:k]])
    return out


def search_samples(targets: np.ndarray, histories: Callable[[slice], np.ndarray], k: int, chunk_rows: int,
                   *, item_vecs: np.ndarray | None = None, item_cat: np.ndarray | None = None,
                   table_budget_bytes: int = 256 << 20,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """GSU for every row: ``(n, k)`` int32 item indices (0-padded).

    targets ``(n,)`` item indices; ``histories(rows)`` returns the padded long histories ``(len(rows),
    L)`` of a slice of rows (built on demand, so only one chunk's histories exist at a time).
    ``item_vecs`` ``(N + 1, d)`` selects the soft (inner-product) search, ``item_cat`` ``(N + 1,)``
    the hard (category) one.

    Soft search per chunk takes the cheaper of two exact routes: when the chunk's distinct targets
    times the catalog fit in ``table_budget_bytes``, it scores those targets against every item once
    (``(U, N + 1)``, one GEMM) and gathers the history's scores; otherwise it gathers the history's
    vectors ``(chunk_rows, L, d)`` and multiplies. Peak extra memory ~ max(budget, chunk_rows x L x d
    x 4 bytes). Both give the same top-k (``soft_topk``'s order and tie rule).
    """
    if (item_vecs is None) == (item_cat is None):
        raise ValueError("give exactly one of item_vecs (soft search) and item_cat (hard search)")
    n = len(targets)
    out = np.zeros((n, k), np.int32)
    vecs = None if item_vecs is None else torch.from_numpy(np.ascontiguousarray(item_vecs, dtype=np.float32))
    cats = None if item_cat is None else torch.from_numpy(np.asarray(item_cat, dtype=np.int64))
    with torch.inference_mode():
        for lo in range(0, n, chunk_rows):
            rows = slice(lo, min(n, lo + chunk_rows))
            hist = torch.from_numpy(np.asarray(histories(rows), dtype=np.int64))
            tgt = torch.from_numpy(np.asarray(targets[rows], dtype=np.int64))
            if vecs is None:
                items = hard_topk(cats[tgt], hist, cats, k)
            else:
                items, _ = soft_topk_by_index(tgt, hist, vecs, k, table_budget_bytes)
            out[rows, :items.shape[1]] = items.numpy()
            if progress:
                progress(rows.stop)
    return out


def _topk_of_scores(s: torch.Tensor, hist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of precomputed scores ``(B, L)`` over the valid history, ties to the most recent."""
    k = min(k, hist.shape[1])
    s = s.masked_fill(hist == 0, NEG_INF)
    top_s, top_i = torch.topk(s.flip(1), k, dim=1)
    return hist.flip(1).gather(1, top_i).masked_fill(torch.isinf(top_s), 0), top_s


def nearest_items(item_vecs: np.ndarray, k: int, chunk_rows: int = 4096) -> np.ndarray:
    """QARM V1 VQ codes: each item's k nearest other items by inner product, ``(N + 1, k)`` int64
    (row 0, padding, and all-zero rows get 0s). Brute force in chunks of ``chunk_rows`` queries."""
    x = torch.from_numpy(np.ascontiguousarray(item_vecs, dtype=np.float32))
    n = x.shape[0]
    k = min(k, max(n - 2, 1))
    live = x.abs().sum(1) > 0
    out = torch.zeros((n, k), dtype=torch.int64)
    with torch.inference_mode():
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            s = x[lo:hi] @ x.T                                        # (chunk, N + 1)
            s[:, ~live] = NEG_INF
            s[torch.arange(hi - lo), torch.arange(lo, hi)] = NEG_INF  # not itself
            top_s, top_i = torch.topk(s, k, dim=1)
            out[lo:hi] = top_i.masked_fill(torch.isinf(top_s), 0)
    out[~live] = 0
    return out.numpy()
