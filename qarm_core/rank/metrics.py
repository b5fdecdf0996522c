"""AUC, GAUC and logloss, vectorised in numpy (no per-user Python loop).

* AUC: the Mann-Whitney statistic, ties between a positive and a negative counting 1/2.
* GAUC: the per-user AUC averaged with weights = the user's number of samples, over the users that
  have both a positive and a negative (the others have no AUC and are left out; ``gauc_users`` says
  how many counted).
* logloss: mean binary cross-entropy of the predicted probabilities (clipped to [1e-7, 1 - 1e-7]).
"""

from __future__ import annotations

import numpy as np


def _avg_ranks(groups: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, 1-based average ranks within each group, ties averaged) for rows sorted by (group, score)."""
    order = np.lexsort((scores, groups))
    g, s = groups[order], scores[order]
    n = len(s)
    # Runs of equal (group, score): every member gets the run's mean position within its group.
    new_run = np.ones(n, bool)
    new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_len = np.diff(np.append(run_start, n))
    new_group = np.ones(n, bool)
    new_group[1:] = g[1:] != g[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    pos_in_group = np.arange(n) - group_start          # 0-based
    first = pos_in_group[run_start]
    ranks = (first + (run_len - 1) / 2.0 + 1.0)[run_id]
    return order, ranks


def group_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: (group ids, AUC (NaN where a class is missing), group sizes)."""
    groups = np.asarray(groups)
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order, ranks = _avg_ranks(groups, scores)
    g, y = groups[order], labels[order]
    uniq, start, size = np.unique(g, return_index=True, return_counts=True)
    n_pos = np.add.reduceat(y, start) if len(g) else np.zeros(0)
    r_pos = np.add.reduceat(ranks * y, start) if len(g) else np.zeros(0)
    n_neg = size - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc = np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)
    return uniq, auc, size


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when one class is missing."""
    _, a, _ = group_auc(np.zeros(len(labels), np.int64), labels, scores)
    return float(a[0]) if len(a) else float("nan")


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """(sample-weighted mean of per-user AUCs over users with both classes, number of such users)."""
    _, a, size = group_auc(users, labels, scores)
    ok = ~np.isnan(a)
    if not ok.any():
        return float("nan"), 0
    return float((a[ok] * size[ok]).sum() / size[ok].sum()), int(ok.sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def evaluate(users: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """AUC, GAUC, logloss (and the GAUC user count) of logits against 0/1 labels."""
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    g, n_users = gauc(users, labels, logits)
    return {"auc": auc(labels, logits), "gauc": g, "logloss": logloss(labels, probs), "gauc_users": float(n_users)}
