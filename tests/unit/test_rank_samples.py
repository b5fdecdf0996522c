"""Ranking samples: deterministic, split by time, labelled by rating, negatives never seen."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from qarm_core.errors import DataError
from qarm_core.rank.data import build_index
from qarm_core.rank.inputs import ItemIndex
from qarm_core.rank.samples import build_samples, check_samples, time_split_violations
from tests.support.data import DUCK, rank_config, tiny_log


def _build(inter, items, tmp_path, **kw):
    cfg = rank_config(**kw)
    return build_samples(inter, build_index(inter, items), cfg.samples, DUCK, tmp_path / "duck")


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


def test_time_split_labels_and_history_positions(tmp_path):
    inter, items = tiny_log()
    s = _build(inter, items, tmp_path, samples={"neg_per_positive": 2, "test_events": 3})
    t = s.samples.to_pandas()
    assert time_split_violations(s.samples) == 0
    swapped = pa.table({"user_id": [1, 1, 1, 2, 2], "ts": [1, 2, 3, 5, 4], "pos": [0, 1, 2, 0, 1],
                        "split": ["train", "train", "test", "train", "test"]})
    assert time_split_violations(swapped) == 1                 # user 2's test event is older
    rated = t[~t.sampled]
    # each user's last 3 events (by (ts, item_id)) are the test set
    ev = inter.to_pandas().sort_values(["user_id", "ts", "item_id"])
    ev["pos"] = ev.groupby("user_id").cumcount()
    ev["n"] = ev.groupby("user_id")["item_id"].transform("size")
    merged = rated.merge(ev, on=["user_id", "item_id", "ts"], suffixes=("", "_ref"))
    assert len(merged) == len(rated) == inter.num_rows
    assert (merged.pos == merged.pos_ref).all()
    assert ((merged.split == "test") == (merged.pos_ref >= merged.n - 3)).all()
    assert ((merged.label == 1) == (merged.rating >= 4)).all()
    # sampled negatives: label 0, same user/pos/ts/split as a positive, never an item the user saw
    neg = t[t.sampled]
    assert (neg.label == 0).all()
    seen = set(zip(inter["user_id"].to_pylist(), inter["item_id"].to_pylist()))
    assert not any((u, i) in seen for u, i in zip(neg.user_id, neg.item_id))
    pos_keys = set(zip(rated[rated.label == 1].user_id, rated[rated.label == 1].pos))
    assert set(zip(neg.user_id, neg.pos)) <= pos_keys
    assert neg.groupby(["user_id", "pos"]).size().max() <= 2
    assert len(neg) > 1.8 * (rated.label == 1).sum()
    # sequences: the user's items in (ts, item_id) order
    seq = dict(zip(s.sequences["user_id"].to_pylist(), s.sequences["items"].to_pylist()))
    for u, g in ev.groupby("user_id"):
        assert seq[u] == g.item_id.tolist()
    assert s.report["train.empty_history"] >= len(seq)        # every user's first event (and its negatives)
    assert check_samples(s, min_test_users=5).success


def test_short_users_are_dropped_and_counted(tmp_path):
    inter, items = tiny_log()
    s = _build(inter, items, tmp_path, samples={"test_events": 10, "min_train_events": 8})
    counts = inter.group_by("user_id").aggregate([("item_id", "count")]).to_pandas()
    assert s.report["users.dropped_short"] == int((counts.item_id_count < 18).sum()) > 0
    assert s.report["users"] == int((counts.item_id_count >= 18).sum())


def test_bad_logs_fail_clearly(tmp_path):
    inter, items = tiny_log()
    index = build_index(inter, items)
    cfg = rank_config()
    unknown = pa.concat_tables([inter, pa.table({"user_id": pa.array([1], pa.int64()), "item_id": pa.array([999], pa.int64()),
                                                 "ts": pa.array([5], pa.int64()), "rating": pa.array([5.0], pa.float32())})])
    with pytest.raises(DataError, match=r"\[stage=rank, dataset=interactions\].*unknown item id.*999"):
        build_samples(unknown, index, cfg.samples, DUCK, tmp_path)
    with pytest.raises(DataError, match="needs a 'rating' or a 'label'"):
        build_samples(inter.drop_columns(["rating"]), index, cfg.samples, DUCK, tmp_path)
    with pytest.raises(DataError, match="no interactions"):
        build_samples(inter.slice(0, 0), index, cfg.samples, DUCK, tmp_path)
    nulls = inter.set_column(3, "rating", pa.array([None] * inter.num_rows, pa.float32()))
    with pytest.raises(DataError, match="neither a rating nor a label"):
        build_samples(nulls, index, cfg.samples, DUCK, tmp_path)
    # labels alone (implicit feedback) work
    labelled = inter.drop_columns(["rating"]).append_column("label", pa.array([1] * inter.num_rows, pa.int8()))
    s = build_samples(labelled, index, cfg.samples, DUCK, tmp_path)
    assert s.report["train.positives"] > 0
    with pytest.raises(DataError, match="unknown item id"):
        ItemIndex(np.array([1, 2, 3])).lookup(np.array([2, 7]), "samples")
