"""AUC, GAUC and logloss against hand computations."""

import math

import numpy as np
import pytest

from qarm_core.rank.metrics import auc, evaluate, gauc, group_auc, logloss


def _pairwise_auc(y, s):
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.5, 0.4, 0.1])) == pytest.approx(0.75)
    # a tie between a positive and a negative counts 1/2: (1, 0.5) -> 0.75... here 1 pair tied of 2
    assert auc(np.array([1, 0, 0]), np.array([0.3, 0.3, 0.1])) == pytest.approx(0.75)
    assert math.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 1)                     # many ties
    assert auc(y, s) == pytest.approx(_pairwise_auc(y, s))


def test_gauc_weights_users_by_samples_and_skips_one_class_users():
    users = np.array([1, 1, 1, 1, 2, 2, 3, 3, 3])
    y = np.array([1, 0, 1, 0, 1, 0, 1, 1, 1])
    s = np.array([0.9, 0.5, 0.4, 0.1, 0.2, 0.8, 0.1, 0.2, 0.3])
    # user 1: AUC 0.75 (4 samples); user 2: 0.0 (2 samples); user 3: positives only -> skipped
    g, n = gauc(users, y, s)
    assert n == 2 and g == pytest.approx((0.75 * 4 + 0.0 * 2) / 6)
    ids, a, size = group_auc(users, y, s)
    assert ids.tolist() == [1, 2, 3] and a[0] == pytest.approx(0.75) and np.isnan(a[2])
    rng = np.random.default_rng(1)
    users = rng.integers(0, 20, 500)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 2)
    ref_num = ref_den = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            ref_num += _pairwise_auc(y[m], s[m]) * m.sum()
            ref_den += m.sum()
    assert gauc(users, y, s)[0] == pytest.approx(ref_num / ref_den)


def test_logloss_and_evaluate():
    y = np.array([1, 0])
    p = np.array([0.8, 0.3])
    assert logloss(y, p) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert np.isfinite(logloss(np.array([1]), np.array([0.0])))       # clipped, not inf
    m = evaluate(np.array([1, 1, 2, 2]), np.array([1, 0, 1, 0]), np.array([2.0, -1.0, 0.5, 1.0]))
    assert m["auc"] == pytest.approx(0.75) and m["gauc"] == pytest.approx(0.5) and m["gauc_users"] == 2
