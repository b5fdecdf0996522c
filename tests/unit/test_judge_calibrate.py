"""Keep thresholds calibrated on the validation period's co-occurrence: labels from the future,
Youden's J, a measured rejection rate, and the imposed fallback when labels are few."""

import numpy as np
import pyarrow as pa

from qarm_core.judge.calibrate import calibrate_keep_rules, future_labels, youden_threshold
from qarm_core.judge.config import KeepRule, KeepRules
from qarm_core.judge.judge import apply_keep_rules


def _judgments(src, dst, score, source):
    n = len(src)
    return pa.table({"src_item": pa.array(src, pa.int64()), "dst_item": pa.array(dst, pa.int64()),
                     "source": source, "model_id": ["m"] * n, "prompt_version": ["p"] * n,
                     "score": pa.array(score, pa.float64()), "keep": [False] * n, "reasoning": pa.nulls(n, pa.string())})


def test_future_labels():
    ev = pa.table({"user_id": [1, 1, 2, 2, 3], "item_id": [10, 20, 20, 30, 40],
                   "ts": [1, 2, 1, 2, 1], "rating": [5.0, 4.0, 5.0, 5.0, 2.0]})
    j = _judgments([10, 10, 20, 10, 10], [20, 30, 30, 40, 50], [0.0] * 5, ["swing"] * 5)
    # {10,20}: user 1 liked both; {10,30}: both liked, never by one user; {20,30}: user 2;
    # 40 was rated 2 (not liked) and 50 never seen: unlabelled
    assert future_labels(j, ev, 4.0).tolist() == [1, 0, 1, -1, -1]
    assert future_labels(j, ev.slice(0, 0), 4.0).tolist() == [-1] * 5
    # against brute force on a random log
    rng = np.random.default_rng(3)
    n = 3000
    log = pa.table({"user_id": rng.integers(0, 80, n), "item_id": rng.integers(0, 60, n), "ts": np.arange(n),
                    "rating": rng.choice([1.0, 5.0], n)})
    src, dst = rng.integers(0, 70, 500), rng.integers(0, 70, 500)
    got = future_labels(_judgments(src, dst, [0.0] * 500, ["swing"] * 500), log, 4.0)
    liked = {}
    for u, i, r in zip(log["user_id"].to_pylist(), log["item_id"].to_pylist(), log["rating"].to_pylist()):
        if r >= 4:
            liked.setdefault(i, set()).add(u)
    want = [-1 if a not in liked or b not in liked else int(bool(liked[a] & liked[b])) for a, b in zip(src, dst)]
    assert got.tolist() == want and {-1, 0, 1} <= set(want)


def test_youden_threshold_separates_and_prefers_the_higher_cut():
    s = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.2])
    y = np.array([1, 1, 1, 0, 0, 0])
    assert youden_threshold(s, y) == (0.7, 1.0)
    t, j = youden_threshold(np.array([1.0, 1.0, 0.5, 0.5]), np.array([1, 0, 1, 0]))
    assert j == 0.0 and t == 1.0


def test_calibration_measures_the_rejection_rate_or_says_it_imposed_it():
    rng = np.random.default_rng(0)
    n = 200
    labels = rng.integers(0, 2, n).astype(np.int8)
    labels[:40] = -1                                             # unlabelled pairs
    labels[150:190] = -1                                         # u2i: 10 labelled rows of 50
    score = labels * 2.0 + rng.standard_normal(n)               # related pairs score higher
    j = _judgments(np.arange(n), np.arange(n) + 1000, score, ["swing"] * 150 + ["u2i"] * 50)
    rules = KeepRules(swing=KeepRule(mode="calibrated", keep_fraction=0.9),
                      u2i=KeepRule(mode="calibrated", keep_fraction=0.3), min_labels_per_class=15)
    resolved, rep = calibrate_keep_rules(j, labels, rules)
    assert resolved.swing.mode == "threshold" and rep["swing.valid.auc"] > 0.8
    assert "calibrated on" in rep["notes"]["swing.keep_rule"]
    kept = apply_keep_rules(j, resolved)["keep"].to_numpy(zero_copy_only=False)[:150]
    m = labels[:150] >= 0
    # the threshold keeps most related and rejects most unrelated labelled swing pairs
    assert kept[m & (labels[:150] == 1)].mean() > 0.75 and kept[m & (labels[:150] == 0)].mean() < 0.25
    # u2i has < 15 labels of a class among its 50 rows: its configured fraction, reported as imposed
    assert resolved.u2i == KeepRule(mode="fraction", keep_fraction=0.3)
    assert rep["notes"]["u2i.keep_rule"].startswith("imposed")
