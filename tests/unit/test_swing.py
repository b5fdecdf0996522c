import itertools
from collections import defaultdict

import numpy as np
import pytest

from qarm_core.pairs.config import SwingConfig
from qarm_core.pairs.swing import mine_swing_pairs, prepare_swing_inputs

NO_CAPS = dict(max_users_per_item=10**9, min_user_items=1, max_user_items=10**9, top_k=10**6)


def brute_force_swing(users, items, alpha1, alpha2, beta):
    """The formula, literally: every unordered user pair of every item pair."""
    I = defaultdict(set)
    for u, i in zip(users, items):
        I[u].add(i)
    U = defaultdict(set)
    for u, its in I.items():
        for i in its:
            U[i].add(u)
    w = {u: (alpha1 + len(its)) ** -beta for u, its in I.items()}
    out = {}
    for i, j in itertools.permutations(U, 2):
        s = 0.0
        for u, v in itertools.combinations(sorted(U[i] & U[j]), 2):
            s += w[u] * w[v] / (alpha2 + len(I[u] & I[v]))
        if s > 0:
            out[(i, j)] = s
    return out


def _log(seed, n_users=25, n_items=15, n_events=160):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_events) * 7 + 3          # sparse, non-dense ids
    items = rng.zipf(1.6, n_events) % n_items * 11 + 100
    return users, items


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha1,alpha2,beta", [(15.0, 0.0, 0.3), (1.0, 1.0, 0.0), (5.0, 0.5, 1.0)])
def test_equals_brute_force_with_caps_off(seed, alpha1, alpha2, beta):
    users, items = _log(seed)
    got = mine_swing_pairs(users, items, SwingConfig(alpha1=alpha1, alpha2=alpha2, beta=beta, **NO_CAPS))
    ref = brute_force_swing(users.tolist(), items.tolist(), alpha1, alpha2, beta)
    d = got.to_pydict()
    mine = {(s, t): sc for s, t, sc in zip(d["src_item"], d["dst_item"], d["score"])}
    assert mine.keys() == ref.keys()
    for k, v in ref.items():
        assert mine[k] == pytest.approx(v, rel=1e-12)
    assert set(d["source"]) == {"swing"}


def test_top_k_keeps_the_best_sorted():
    users, items = _log(1, n_users=40, n_items=20, n_events=400)
    full = mine_swing_pairs(users, items, SwingConfig(**NO_CAPS)).to_pandas()
    top = mine_swing_pairs(users, items, SwingConfig(**{**NO_CAPS, "top_k": 3})).to_pandas()
    assert top.groupby("src_item").size().max() == 3
    for src, g in top.groupby("src_item", sort=False):
        want = full[full.src_item == src].sort_values(["score", "dst_item"], ascending=[False, True]).head(3)
        assert g.dst_item.tolist() == want.dst_item.tolist()
        assert g.score.is_monotonic_decreasing


def test_user_item_bounds_filter_users():
    # user 1 has 1 item, user 2 has 3 items, user 3 has 5 items
    users = np.array([1] + [2] * 3 + [3] * 5)
    items = np.array([10, 10, 11, 12, 10, 11, 12, 13, 14])
    inp = prepare_swing_inputs(users, items, SwingConfig(min_user_items=2, max_user_items=4))
    assert len(inp.weights) == 1  # only user 2 survives
    assert inp.item_ids.tolist() == [10, 11, 12]


def test_users_per_item_cap_is_honoured_and_seeded():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 300, 5000)
    items = rng.integers(0, 30, 5000)
    p = SwingConfig(max_users_per_item=20, seed=5)
    a = prepare_swing_inputs(users, items, p)
    assert np.diff(a.item_ptr).max() == 20
    b = prepare_swing_inputs(users, items, p)
    assert np.array_equal(a.item_users, b.item_users)
    c = prepare_swing_inputs(users, items, SwingConfig(max_users_per_item=20, seed=6))
    assert not np.array_equal(a.item_users, c.item_users)
    t1 = mine_swing_pairs(users, items, p)
    assert t1.equals(mine_swing_pairs(users, items, p))          # same seed, same output
    # the sample of an item does not depend on row order
    perm = rng.permutation(5000)
    assert t1.equals(mine_swing_pairs(users[perm], items[perm], p))


def test_duplicates_do_not_count_twice():
    users = np.array([1, 1, 2, 2, 3, 3])
    items = np.array([5, 6, 5, 6, 5, 6])
    once = mine_swing_pairs(users, items, SwingConfig(**NO_CAPS))
    twice = mine_swing_pairs(np.r_[users, users], np.r_[items, items], SwingConfig(**NO_CAPS))
    assert once.equals(twice)
    # 3 user pairs, each w^2 / |{5, 6}|, w = (15 + 2) ** -0.3
    assert once.column("score")[0].as_py() == pytest.approx(3 * 17 ** -0.6 / 2)


def test_no_pairs_and_bad_params():
    t = mine_swing_pairs(np.array([1, 2]), np.array([5, 6]), SwingConfig(min_user_items=1))
    assert t.num_rows == 0
    with pytest.raises(ValueError, match="min_user_items"):
        SwingConfig(min_user_items=5, max_user_items=2)
    with pytest.raises(ValueError, match="max_users_per_item"):
        SwingConfig(max_users_per_item=1)
    with pytest.raises(ValueError, match="differ in length"):
        mine_swing_pairs(np.array([1, 2]), np.array([5]))
