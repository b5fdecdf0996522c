import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from qarm_core.schemas import INTERACTIONS, ITEMS
from qarm_core.synth import SynthSpec, iter_synthetic_interactions, iter_synthetic_items


def _table(it):
    return pa.Table.from_batches(list(it))


def test_deterministic_and_seed_sensitive():
    s = SynthSpec(users=50, items=30, interactions=2_000, seed=3)
    a = _table(iter_synthetic_interactions(s))
    assert a.equals(_table(iter_synthetic_interactions(s)))
    assert not a.equals(_table(iter_synthetic_interactions(SynthSpec(50, 30, 2_000, seed=4))))
    assert _table(iter_synthetic_items(s)).equals(_table(iter_synthetic_items(s)))


def test_shapes_ranges_and_keys():
    s = SynthSpec(users=200, items=100, interactions=5_000, seed=0)
    inter = _table(iter_synthetic_interactions(s))
    items = _table(iter_synthetic_items(s))
    assert inter.schema.equals(INTERACTIONS.schema) and items.schema.equals(ITEMS.schema)
    assert inter.num_rows == 5_000 and items.num_rows == 100
    assert pc.min(inter["item_id"]).as_py() >= 0 and pc.max(inter["item_id"]).as_py() < 100
    assert pc.max(inter["user_id"]).as_py() < 200
    ts = inter["ts"].to_numpy()
    assert np.all(np.diff(ts) > 0)  # strictly increasing, so (user, item, ts) is a key
    assert set(inter["rating"].to_pylist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert items["title"].null_count == 0 and all(len(t) > 0 for t in items["title"].to_pylist())


def test_popularity_is_zipf_like():
    s = SynthSpec(users=1_000, items=1_000, interactions=50_000, seed=1, zipf_exponent=1.1)
    counts = np.sort(np.bincount(_table(iter_synthetic_interactions(s))["item_id"].to_numpy(), minlength=1000))[::-1]
    # the top 1% of items take far more than 1% of the events; expected share of rank 1 ~ 1/H(1000,1.1)
    assert counts[:10].sum() / counts.sum() > 0.25
    assert counts[0] > 20 * np.median(counts)


def test_generated_in_bounded_blocks(monkeypatch):
    """Output is produced block by block (memory bounded by one block), never as one array."""
    import qarm_core.synth as synth
    monkeypatch.setattr(synth, "BLOCK_ROWS", 100)
    s = SynthSpec(users=10, items=10, interactions=250, seed=2)
    batches = list(iter_synthetic_interactions(s))
    assert [b.num_rows for b in batches] == [100, 100, 50]


@pytest.mark.parametrize("kw", [{"users": 0}, {"items": 0}, {"interactions": 0}, {"zipf_exponent": 0}])
def test_invalid_spec(kw):
    args = {"users": 1, "items": 1, "interactions": 1, **kw}
    with pytest.raises(ValueError, match="synth"):
        SynthSpec(**args)


def test_growth_appends_a_day_without_touching_the_base():
    from qarm_core.synth import GrowthSpec, iter_growth_interactions, iter_growth_items

    base = SynthSpec(users=100, items=200, interactions=3_000, seed=5)
    g = GrowthSpec(base, day=1, new_items=20, new_interactions=600)
    items = _table(iter_growth_items(g))
    assert items["item_id"].to_pylist() == list(range(200, 220))
    assert _table(iter_synthetic_items(base)).num_rows == 200      # the base catalog is as it was
    new = _table(iter_growth_interactions(g))
    old = _table(iter_synthetic_interactions(base))
    assert new.num_rows == 600 and pc.min(new["ts"]).as_py() > pc.max(old["ts"]).as_py()
    ids = new["item_id"].to_numpy()
    assert ids.max() < 220 and (ids >= 200).sum() > 0            # new items get traffic
    assert new.equals(_table(iter_growth_interactions(g)))       # deterministic
    # popular items stay popular: the day's top item is among the base log's top 5
    top_old = np.argsort(np.bincount(old["item_id"].to_numpy(), minlength=220))[::-1][:5]
    assert np.bincount(ids, minlength=220).argmax() in top_old
    with pytest.raises(ValueError, match="synth growth"):
        GrowthSpec(base, day=0)
    with pytest.raises(ValueError, match="prior_items"):
        GrowthSpec(base, day=2, prior_items=-1)


def test_growth_days_chain_after_each_other():
    """Day 2 of a grown log adds ids after day 1's and events after day 1's; day 1 is as it was."""
    from qarm_core.synth import GrowthSpec, iter_growth_interactions, iter_growth_items

    base = SynthSpec(users=100, items=200, interactions=3_000, seed=5)
    day1 = GrowthSpec(base, day=1, new_items=20, new_interactions=600)
    day2 = day1.next_day()
    assert (day2.day, day2.prior_items, day2.first_item, day2.new_items) == (2, 20, 220, 20)
    assert _table(iter_growth_items(day2))["item_id"].to_pylist() == list(range(220, 240))
    ev1, ev2 = _table(iter_growth_interactions(day1)), _table(iter_growth_interactions(day2))
    assert pc.min(ev2["ts"]).as_py() > pc.max(ev1["ts"]).as_py()
    ids2 = ev2["item_id"].to_numpy()
    assert ids2.max() < 240 and (ids2 >= 220).sum() > 0            # day 2's new items get traffic
    assert ((ids2 >= 200) & (ids2 < 220)).any()                     # and day 1's still do
    assert not ev1.equals(ev2)
    # day 1 does not depend on whether a day 2 follows
    assert ev1.equals(_table(iter_growth_interactions(GrowthSpec(base, day=1, new_items=20, new_interactions=600))))
