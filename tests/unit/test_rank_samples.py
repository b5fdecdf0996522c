"""Ranking samples: deterministic, split by the pipeline's periods, labelled by rating, negatives
never seen by the end of their period, and train/validation samples blind to the test period."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from qarm_core.errors import DataError
from qarm_core.rank.data import build_index
from qarm_core.rank.inputs import ItemIndex
from qarm_core.rank.samples import build_samples, check_samples, period_violations
from tests.support.data import DUCK, rank_config, tiny_cutoffs, tiny_log


def _build(inter, items, tmp_path, cut=None, negative_sets=1, **kw):
    cfg = rank_config(**kw)
    cut = cut or tiny_cutoffs(inter)
    return build_samples(inter, build_index(inter, items), cfg.samples, DUCK, tmp_path / "duck", cut,
                         negative_sets=negative_sets)


def test_samples_are_deterministic_and_independent_of_row_order(tmp_path):
    inter, items = tiny_log()
    a = _build(inter, items, tmp_path)
    shuffled = inter.take(np.random.default_rng(3).permutation(inter.num_rows))
    b = _build(shuffled, items, tmp_path)
    assert a.samples.equals(b.samples) and a.sequences.equals(b.sequences)
    c = _build(inter, items, tmp_path, samples={"seed": 1})
    # another seed draws other negatives, the rated events stay
    assert not a.samples.equals(c.samples)
    rated = lambda t: t.filter(pc.invert(t["sampled"]))  # noqa: E731
    assert rated(a.samples).equals(rated(c.samples))


def test_split_by_period_labels_negatives_and_history_positions(tmp_path):
    inter, items = tiny_log()
    cut = tiny_cutoffs(inter)
    s = _build(inter, items, tmp_path, cut, samples={"neg_per_positive": 2})
    t = s.samples.to_pandas()
    rated = t[~t.sampled]
    ev = inter.to_pandas().sort_values(["user_id", "ts", "item_id"])
    ev["pos"] = ev.groupby("user_id").cumcount()
    merged = rated.merge(ev, on=["user_id", "item_id", "ts"], suffixes=("", "_ref"))
    assert len(merged) == len(rated) == inter.num_rows
    assert (merged.pos == merged.pos_ref).all()
    period = np.array(["train", "valid", "test"])[cut.period_of(merged.ts.to_numpy())]
    assert (merged.split == period).all() and set(period) == {"train", "valid", "test"}
    assert ((merged.label == 1) == (merged.rating >= 4)).all()
    # sampled negatives: label 0, same user/pos/ts/split as a positive, never an item the user had
    # touched by the end of the negative's period
    neg = t[t.sampled]
    assert (neg.label == 0).all()
    ev["period"] = cut.period_of(ev.ts.to_numpy())
    first = ev.groupby(["user_id", "item_id"]).period.min().to_dict()
    rank_of = {"train": 0, "valid": 1, "test": 2}
    assert all(first.get((u, i), 9) > rank_of[sp] for u, i, sp in zip(neg.user_id, neg.item_id, neg.split))
    pos_keys = set(zip(rated[rated.label == 1].user_id, rated[rated.label == 1].pos))
    assert set(zip(neg.user_id, neg.pos)) <= pos_keys
    assert neg.groupby(["user_id", "pos"]).size().max() <= 2
    assert len(neg) > 1.8 * (rated.label == 1).sum()
    seq = dict(zip(s.sequences["user_id"].to_pylist(), s.sequences["items"].to_pylist()))
    for u, g in ev.groupby("user_id"):
        assert seq[u] == g.item_id.tolist()
    assert check_samples(s, cut, min_test_users=2).success
    # a sample whose split does not match its time is caught by the gate
    wrong = s.samples.set_column(s.samples.schema.get_field_index("split"), "split",
                                 pa.array(["test"] * s.samples.num_rows))
    assert period_violations(wrong, cut) == int((t.split != "test").sum()) > 0
    bad = type(s)(wrong, s.sequences, s.report)
    assert not check_samples(bad, cut).success


def test_negative_sets_differ_and_each_has_the_configured_count(tmp_path):
    inter, items = tiny_log()
    s = _build(inter, items, tmp_path, negative_sets=3, samples={"neg_per_positive": 1})
    t = s.samples.to_pandas()
    neg = t[t.sampled]
    assert sorted(neg.neg_set.unique()) == [0, 1, 2] and (t[~t.sampled].neg_set == -1).all()
    assert neg.groupby(["user_id", "pos", "neg_set"]).size().max() == 1
    per_set = [set(zip(g.user_id, g.pos, g.item_id)) for _, g in neg.groupby("neg_set")]
    assert len(per_set[0] & per_set[1]) < 0.5 * len(per_set[0])


def test_train_and_valid_samples_ignore_the_test_period(tmp_path):
    """Perturbing or dropping every test-period event leaves every training and validation sample
    (negatives included) bit-for-bit unchanged."""
    inter, items = tiny_log()
    cut = tiny_cutoffs(inter)
    base = _build(inter, items, tmp_path, cut, negative_sets=2)
    test = cut.period_of(inter["ts"].to_numpy()) == 2
    rng = np.random.default_rng(5)
    item = inter["item_id"].to_numpy().copy()
    item[test] = rng.choice(items["item_id"].to_numpy(), test.sum())
    rating = inter["rating"].to_numpy().copy()
    rating[test] = rng.choice([1.0, 5.0], test.sum())
    perturbed = inter.set_column(1, "item_id", pa.array(item)).set_column(3, "rating", pa.array(rating, pa.float32()))
    dropped = inter.filter(pa.array(~test))
    not_test = lambda s: s.samples.filter(pc.not_equal(s.samples["split"], "test"))  # noqa: E731
    for other in (perturbed, dropped):
        got = _build(other, items, tmp_path, cut, negative_sets=2)
        assert not_test(got).equals(not_test(base))
    # ... while a change inside the validation period does change the validation samples
    valid = np.flatnonzero(cut.period_of(inter["ts"].to_numpy()) == 1)
    rating2 = inter["rating"].to_numpy().copy()
    rating2[valid] = 6.0 - rating2[valid]
    changed = _build(inter.set_column(3, "rating", pa.array(rating2, pa.float32())), items, tmp_path, cut, 2)
    assert not not_test(changed).equals(not_test(base))


def test_bad_logs_fail_clearly(tmp_path):
    inter, items = tiny_log()
    index = build_index(inter, items)
    cfg = rank_config()
    cut = tiny_cutoffs(inter)
    unknown = pa.concat_tables([inter, pa.table({"user_id": pa.array([1], pa.int64()), "item_id": pa.array([999], pa.int64()),
                                                 "ts": pa.array([5], pa.int64()), "rating": pa.array([5.0], pa.float32())})])
    with pytest.raises(DataError, match=r"\[stage=rank, dataset=interactions\].*unknown item id.*999"):
        build_samples(unknown, index, cfg.samples, DUCK, tmp_path, cut)
    with pytest.raises(DataError, match="needs a 'rating' or a 'label'"):
        build_samples(inter.drop_columns(["rating"]), index, cfg.samples, DUCK, tmp_path, cut)
    with pytest.raises(DataError, match="no interactions"):
        build_samples(inter.slice(0, 0), index, cfg.samples, DUCK, tmp_path, cut)
    nulls = inter.set_column(3, "rating", pa.array([None] * inter.num_rows, pa.float32()))
    with pytest.raises(DataError, match="neither a rating nor a label"):
        build_samples(nulls, index, cfg.samples, DUCK, tmp_path, cut)
    # labels alone (implicit feedback) work
    labelled = inter.drop_columns(["rating"]).append_column("label", pa.array([1] * inter.num_rows, pa.int8()))
    s = build_samples(labelled, index, cfg.samples, DUCK, tmp_path, cut)
    assert s.report["train.positives"] > 0
    with pytest.raises(DataError, match="unknown item id"):
        ItemIndex(np.array([1, 2, 3])).lookup(np.array([2, 7]), "samples")
