"""Keep thresholds calibrated on validation labels, so that each source's rejection rate is measured.

Labels come from the future, not from any model of the pipeline: a mined pair ``{a, b}`` is
**related** when some user liked both ``a`` and ``b`` in the validation period, **unrelated** when
both were liked by someone in that period but never by the same user, and **unlabelled** otherwise
(an item nobody liked then says nothing about the pair). Per source, the threshold is the judge
score that maximises Youden's J (true-positive rate minus false-positive rate) on the labelled
pairs; pairs scoring at or above it are kept. The rejection rate that follows is a measurement of
how many mined pairs the judge finds unrelated, to set beside QARM V2's (>10% of I2I, >70% of U2I).

With too few labels of either class, the source keeps its configured ``keep_fraction`` and the
report says that the rate was imposed, not measured.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from qarm_core.arrays import sorted_unique
from qarm_core.events import positive_mask
from qarm_core.judge.config import KeepRule, KeepRules
from qarm_core.judge.judge import SOURCES, STAGE


def future_labels(pairs: pa.Table, events: pa.Table, min_rating: float | None) -> np.ndarray:
    """``(n,)`` int8 per row of ``pairs`` (src_item, dst_item): 1 related, 0 unrelated, -1
    unlabelled, from the positive events of a later period (see the module doc)."""
    n = pairs.num_rows
    out = np.full(n, -1, np.int8)
    if n == 0 or events.num_rows == 0:
        return out
    pos = events.filter(pa.array(positive_mask(events, min_rating, STAGE, "valid_events")))
    liked, item_d = np.unique(pos["item_id"].to_numpy().astype(np.int64), return_inverse=True)
    _, user_d = np.unique(pos["user_id"].to_numpy(), return_inverse=True)
    a = pairs["src_item"].to_numpy().astype(np.int64)
    b = pairs["dst_item"].to_numpy().astype(np.int64)
    ia, ib = np.searchsorted(liked, a), np.searchsorted(liked, b)
    both = (ia < len(liked)) & (ib < len(liked))
    both &= (liked[np.minimum(ia, len(liked) - 1)] == a) & (liked[np.minimum(ib, len(liked) - 1)] == b)
    rows = np.flatnonzero(both)
    if len(rows) == 0:
        return out
    n_items = len(liked)
    keys = sorted_unique(user_d.astype(np.int64) * n_items + item_d)           # (user, item) likes, sorted
    key_user, key_item = keys // n_items, keys % n_items
    by_item = np.lexsort((key_user, key_item))
    users_of = key_user[by_item]                                             # users grouped by item
    count = np.bincount(key_item, minlength=n_items)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    # probe the users of the less-liked item of each pair against the other item's likes
    pa_, pb_ = ia[rows], ib[rows]
    small = np.where(count[pa_] <= count[pb_], pa_, pb_)
    other = np.where(count[pa_] <= count[pb_], pb_, pa_)
    n = count[small]
    which = np.repeat(np.arange(len(rows)), n)
    offset = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    probe = users_of[np.repeat(start[small], n) + offset] * n_items + np.repeat(other, n)
    pos_in = np.searchsorted(keys, probe)
    hit = (pos_in < len(keys)) & (keys[np.minimum(pos_in, len(keys) - 1)] == probe)
    out[rows] = (np.bincount(which, weights=hit, minlength=len(rows)) > 0).astype(np.int8)
    return out


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, J): the score t maximising TPR - FPR of ``score >= t`` over the labelled pairs
    (labels 0/1); the highest such t on ties, so as few pairs as possible are kept for the same J."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.float64)
    tp, fp = np.cumsum(y), np.cumsum(1 - y)
    last = np.r_[s[1:] != s[:-1], True]             # cut after a run of equal scores
    j = tp[last] / max(y.sum(), 1) - fp[last] / max((1 - y).sum(), 1)
    best = int(np.argmax(j))                         # first max = highest threshold
    return float(s[last][best]), float(j[best])


def calibrate_keep_rules(judgments: pa.Table, labels: np.ndarray, rules: KeepRules) -> tuple[KeepRules, dict]:
    """Per source in ``rules`` with mode ``calibrated``: a threshold rule from the labelled rows of
    ``judgments`` (``labels`` from ``future_labels``), or, with fewer than ``min_per_class`` labels
    of either class, its ``keep_fraction``. Returns the resolved rules and a report:
    ``<source>.valid.labelled``, ``.valid.related``, ``.valid.auc`` (judge score vs label),
    ``.threshold``, ``.youden_j`` and ``notes`` ``<source>.keep_rule``."""
    from qarm_core.rank.metrics import auc

    min_per_class = rules.min_labels_per_class
    scores = judgments["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    source = np.asarray(judgments["source"].to_pylist(), dtype=object)
    resolved, report, notes = {}, {}, {}
    for s in SOURCES:
        rule: KeepRule = getattr(rules, s)
        m = (source == s) & (labels >= 0)
        y = labels[m]
        n1, n0 = int((y == 1).sum()), int((y == 0).sum())
        report |= {f"{s}.valid.labelled": float(m.sum()), f"{s}.valid.related": float(n1)}
        if n1 and n0:
            report[f"{s}.valid.auc"] = auc(y, scores[m])
        if rule.mode != "calibrated":
            resolved[s] = rule
            notes[f"{s}.keep_rule"] = f"{rule.mode} (configured)"
            continue
        if min(n1, n0) < min_per_class:
            resolved[s] = KeepRule(mode="fraction", keep_fraction=rule.keep_fraction)
            notes[f"{s}.keep_rule"] = (f"imposed: keep_fraction {rule.keep_fraction} ({n1} related / {n0} unrelated "
                                       f"validation labels, fewer than {min_per_class} of a class)")
            continue
        t, j = youden_threshold(scores[m], y)
        resolved[s] = KeepRule(mode="threshold", threshold=t)
        report |= {f"{s}.threshold": t, f"{s}.youden_j": j}
        notes[f"{s}.keep_rule"] = f"calibrated on {n1 + n0} validation labels: score >= {t:.4g}"
    report["notes"] = notes
    return KeepRules(**resolved, min_labels_per_class=min_per_class), report
