import numpy as np
import pyarrow as pa
import pytest

from qarm_core.devices import mkl_threads
from qarm_core.errors import DataError
from qarm_core.pairs.config import TwoTowerConfig
from qarm_core.pairs.two_tower import (MODEL_FIELDS, evaluate_recall, histories, load_towers, mine_u2i_pairs,
                                       reuse_blocker, reuse_towers, save_towers, time_split, train_two_tower,
                                       u2i_pairs)
from qarm_core.schemas import PAIRS
from qarm_core.synth import SynthSpec, iter_synthetic_interactions, iter_synthetic_items

SMALL = TwoTowerConfig(dim=16, hidden=32, text_buckets=1024, epochs=2, batch_size=64, history_len=8,
                       top_m=3, window_events=2)


def _items(ids):
    ids = sorted(set(ids))
    return pa.table({"item_id": pa.array(ids, pa.int64()), "title": [f"Movie {i} (199{i % 10})" for i in ids],
                     "tags": [["Drama"] if i % 2 else ["Comedy", "Drama"] for i in ids]})


def _log(rows):
    """rows: (user, item, ts, rating or None, label or None)."""
    u, i, t, r, lab = zip(*rows)
    return pa.table({"user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()),
                     "ts": pa.array(t, pa.int64()), "rating": pa.array(r, pa.float32()),
                     "label": pa.array(lab, pa.int8())})


# user 1: positives 10 (first event, no history), 12, 13 -> holdout 13; 14 comes after it.
# user 2: one positive (10) with history -> a training target, no holdout.
# user 3: same ts, ties by item_id -> 12 then 20; holdout 20; 12 has no history.
# user 4: no ratings, labels decide: positives 11 and 15 -> holdout 15, target 11 (after 10).
HAND = [
    (1, 10, 1, 5.0, None), (1, 11, 2, 2.0, None), (1, 12, 3, 4.0, None), (1, 13, 4, 5.0, None),
    (1, 14, 5, 1.0, None),
    (2, 11, 1, 2.0, None), (2, 10, 2, 5.0, None),
    (3, 20, 5, 5.0, None), (3, 12, 5, 4.0, None),
    (4, 10, 1, None, 0), (4, 11, 2, None, 1), (4, 14, 3, None, 0), (4, 15, 4, None, 1),
]


@pytest.fixture(scope="module")
def hand_split():
    log = _log(HAND)
    return time_split(log, _items(log["item_id"].to_pylist()), TwoTowerConfig(history_len=3))


def _rows(split, pos):
    return [(int(split.user_ids[split.seq_user[p]]), int(split.item_ids[split.seq_item[p]])) for p in pos]


def test_split_holdout_is_last_positive_per_user(hand_split):
    assert sorted(_rows(hand_split, hand_split.holdout_pos)) == [(1, 13), (3, 20), (4, 15)]
    assert sorted(_rows(hand_split, hand_split.train_pos)) == [(1, 12), (2, 10), (4, 11)]
    assert sorted(_rows(hand_split, hand_split.window_pos)) == [(1, 13), (2, 10), (3, 20), (4, 15)]
    count = dict(zip(hand_split.item_ids.tolist(), hand_split.item_count.tolist()))
    assert count == {10: 1, 11: 1, 12: 1, 13: 0, 14: 0, 15: 0, 20: 0}   # holdouts not counted


def test_max_train_samples_keeps_the_most_recent():
    log = _log(HAND)
    capped = time_split(log, _items(log["item_id"].to_pylist()), TwoTowerConfig(history_len=3, max_train_samples=2))
    # training targets at ts 3 (user 1, item 12), 2 (user 2, item 10), 2 (user 4, item 11): the
    # two most recent are ts 3 and the later-positioned of the two at ts 2
    assert sorted(_rows(capped, capped.train_pos)) == [(1, 12), (4, 11)]
    assert sorted(_rows(capped, capped.holdout_pos)) == [(1, 13), (3, 20), (4, 15)]   # holdout untouched
    with pytest.raises(ValueError, match="max_train_samples"):
        TwoTowerConfig(max_train_samples=1)


def test_training_histories_never_reach_the_holdout(hand_split):
    s = hand_split
    holdout_of = dict(zip(s.seq_user[s.holdout_pos].tolist(), s.holdout_pos.tolist()))
    hist, mask = histories(s, s.train_pos, 3)
    for p, h, m in zip(s.train_pos, hist, mask):
        u = s.seq_user[p]
        assert p < holdout_of.get(u, np.inf)
        start = s.user_start[u]
        assert h[m].tolist() == s.seq_item[max(start, p - 3):p].tolist()     # only earlier events
    hist, mask = histories(s, s.holdout_pos, 3)
    got = {int(s.user_ids[s.seq_user[p]]): s.item_ids[h[m]].tolist()
           for p, h, m in zip(s.holdout_pos, hist, mask)}
    assert got == {1: [10, 11, 12], 3: [12], 4: [10, 11, 14]}


def test_histories_are_right_aligned_and_capped(hand_split):
    pos = hand_split.holdout_pos[:1]                               # user 1, 3 earlier events
    hist, mask = histories(hand_split, pos, 2)
    assert mask.tolist() == [[True, True]]
    assert hand_split.item_ids[hist[0]].tolist() == [11, 12]       # the two most recent
    hist, mask = histories(hand_split, pos, 5)
    assert mask.tolist() == [[False, False, True, True, True]]
    assert (hist[~mask] == hand_split.n_items).all()


# ---------------------------------------------------------------- a small synthetic log
@pytest.fixture(scope="module")
def synth():
    spec = SynthSpec(users=60, items=120, interactions=4000, seed=3)
    inter = pa.Table.from_batches(list(iter_synthetic_interactions(spec)))
    items = pa.Table.from_batches(list(iter_synthetic_items(spec)))
    return inter, items


@pytest.fixture(scope="module")
def trained(synth):
    split = time_split(*synth, SMALL)
    return split, train_two_tower(split, SMALL)


def test_padding_does_not_change_the_user_embedding(trained):
    split, model = trained
    hist, mask = histories(split, split.train_pos, SMALL.history_len)   # early ones are padded
    assert (~mask).any() and mask.any(axis=1).all()
    other = np.where(mask, hist, np.random.default_rng(0).integers(0, split.n_items, hist.shape))
    np.testing.assert_array_equal(model.user_embeddings(hist, mask), model.user_embeddings(other, mask))
    emb = model.user_embeddings(hist, mask)
    assert emb.shape == (len(hist), SMALL.dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert model.item_embeddings().shape == (split.n_items, SMALL.dim)


def test_same_seed_same_output(synth, trained):
    import torch

    split, model = trained
    threads = torch.get_num_threads()
    again = train_two_tower(split, SMALL)
    assert torch.get_num_threads() == threads                       # restored after training
    np.testing.assert_array_equal(model.item_embeddings(), again.item_embeddings())
    assert u2i_pairs(model, split).equals(u2i_pairs(again, split))
    other = train_two_tower(split, TwoTowerConfig(**{**SMALL.__dict__, "seed": 1}))
    assert not np.array_equal(model.item_embeddings(), other.item_embeddings())


def test_u2i_pairs_come_from_the_users_history(trained):
    split, model = trained
    pairs = u2i_pairs(model, split)
    assert pairs.schema == PAIRS.schema and pairs.num_rows > 0
    d = pairs.to_pydict()
    assert set(d["source"]) == {"u2i"}
    assert all(s != t for s, t in zip(d["src_item"], d["dst_item"]))
    assert len(set(zip(d["src_item"], d["dst_item"]))) == pairs.num_rows          # deduplicated
    # Every pair is (window target, one of its top-m history items), and each target's pairs
    # number at most m per window event with that target.
    hist, mask = histories(split, split.window_pos, SMALL.history_len)
    allowed, events = {}, {}
    for p, h, m in zip(split.window_pos, hist, mask):
        t = int(split.item_ids[split.seq_item[p]])
        allowed.setdefault(t, set()).update(split.item_ids[h[m]].tolist())
        events[t] = events.get(t, 0) + 1
    per_src = {}
    for s, t in zip(d["src_item"], d["dst_item"]):
        assert t in allowed[s]
        per_src[s] = per_src.get(s, 0) + 1
    assert all(n <= SMALL.top_m * events[s] for s, n in per_src.items())
    # Sorted by (src, score desc, dst); the score is the inner product of item vectors.
    emb, row = model.item_embeddings(), {int(i): k for k, i in enumerate(split.item_ids)}
    for s, t, sc in list(zip(d["src_item"], d["dst_item"], d["score"]))[:20]:
        assert sc == pytest.approx(float(emb[row[s]] @ emb[row[t]]), abs=1e-5)
    keys = list(zip(d["src_item"], [-x for x in d["score"]], d["dst_item"]))
    assert keys == sorted(keys)


def test_u2i_pairs_keep_top_m_of_distinct_history_items(trained):
    split, model = trained
    pairs = u2i_pairs(model, split).to_pydict()
    emb, row = model.item_embeddings(), {int(i): k for k, i in enumerate(split.item_ids)}
    got = {}
    for src, dst in zip(pairs["src_item"], pairs["dst_item"]):
        got.setdefault(src, set()).add(dst)
    # For each window event, its top m distinct history items by brute force are all in the table.
    hist, mask = histories(split, split.window_pos, SMALL.history_len)
    for p, h, m in zip(split.window_pos, hist, mask):
        t = int(split.item_ids[split.seq_item[p]])
        cand = {int(i) for i in split.item_ids[h[m]]} - {t}
        best = sorted(cand, key=lambda i: (-float(emb[row[t]] @ emb[row[i]]), i))[:SMALL.top_m]
        assert set(best) <= got.get(t, set())



def test_mine_end_to_end_and_recall_report(synth):
    import faiss
    import torch

    # faiss and torch share one OpenMP runtime: a one-thread faiss search must not leave every later
    # torch stage of the flow (judge, QA, training) on one thread. torch.get_num_threads() reads
    # OpenMP's count only: MKL's (torch's float32 matmuls) is checked too - it stayed at 1 while
    # torch said 2, and the judge after the miner ran 1.7x slower
    torch.set_num_threads(2)
    pairs, report, _ = mine_u2i_pairs(*synth, TwoTowerConfig(**{**SMALL.__dict__, "epochs": 1}), k=10)
    assert torch.get_num_threads() == 2 and faiss.omp_get_max_threads() == 2
    assert mkl_threads() in (None, 2)
    assert report["n_pairs"] == pairs.num_rows > 0
    assert report["n_users"] > 0 and report["k"] == 10


def test_the_recall_check_leaves_torch_matmuls_on_all_their_threads(trained):
    """evaluate_recall runs faiss and the user tower on one thread; after it, torch's float32 matmuls
    (MKL) have the caller's threads again, not just OpenMP (MKL stayed at 1 in a refresh)."""
    import faiss
    import torch

    split, model = trained
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        evaluate_recall(model, split, k=5)
        assert torch.get_num_threads() == 2 and faiss.omp_get_max_threads() == 2
        assert mkl_threads() in (None, 2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("k", [1, 5, 200])
def test_recall_matches_a_brute_force_count(trained, k):
    """Both recalls against a per-user loop: rank the unseen items by score (two-tower: inner product
    of the towers; popularity: training count, ties by item index) and look for the holdout item."""
    split, model = trained
    got = evaluate_recall(model, split, k=k)
    emb = model.item_embeddings()
    tt = pop = 0
    for p in split.holdout_pos:
        start = split.user_start[split.seq_user[p]]
        seen = set(split.seq_item[start:p].tolist())
        target = int(split.seq_item[p])
        hist, mask = histories(split, np.array([p]), model.params.history_len)
        u = model.user_embeddings(hist, mask)[0]
        unseen = [i for i in range(split.n_items) if i not in seen]
        by_score = sorted(unseen, key=lambda i: (-float(emb[i] @ u), i))[:k]
        by_count = sorted(unseen, key=lambda i: (-int(split.item_count[i]), i))[:k]
        tt += target in by_score
        pop += target in by_count
    n = len(split.holdout_pos)
    assert got["n_users"] == n and got["recall_popularity"] == pop / n
    assert got["recall_two_tower"] == pytest.approx(tt / n, abs=1.5 / n)   # float ties may order differently
    if k >= split.n_items:   # every unseen item is retrieved: only a target seen earlier can miss
        assert got["recall_popularity"] == got["recall_two_tower"] > 0


# ---------------------------------------------------------------- bad input
def test_empty_interactions_raise(synth):
    empty = synth[0].slice(0, 0)
    with pytest.raises(DataError, match=r"\[stage=mine, dataset=interactions\] no interactions"):
        time_split(empty, synth[1], SMALL)


def test_items_missing_ids_raise(synth):
    inter, items = synth
    wanted = set(inter["item_id"].to_pylist())
    drop = min(wanted)
    kept = items.filter(pa.compute.not_equal(items["item_id"], drop))
    with pytest.raises(DataError, match=rf"dataset=items\].*not in the items table, e\.g\. \[{drop}\]"):
        time_split(inter, kept, SMALL)


def test_other_bad_input_raises():
    log = _log(HAND)
    items = _items(log["item_id"].to_pylist())
    with pytest.raises(DataError, match="needs a 'rating' or a 'label'"):
        time_split(log.drop_columns(["rating", "label"]), items)
    with pytest.raises(DataError, match="missing column 'ts'"):
        time_split(log.drop_columns(["ts"]), items)
    with pytest.raises(DataError, match="appear more than once"):
        time_split(log, pa.concat_tables([items, items]))
    with pytest.raises(DataError, match="'user_id' has 1 null"):
        time_split(log.set_column(0, "user_id", pa.array([None] + [1] * (log.num_rows - 1), pa.int64())),
                   items)
    lonely = _log([(1, 10, 1, 5.0, None), (2, 11, 1, 5.0, None)])                 # no history at all
    with pytest.raises(DataError, match="0 training sample"):
        train_two_tower(time_split(lonely, items))


@pytest.mark.parametrize("bad", [dict(dim=0), dict(history_len=0), dict(temperature=0.0),
                                 dict(batch_size=1), dict(lr=-1.0), dict(top_m=0),
                                 dict(recency_half_life=-1.0), dict(window_events=0)])
def test_params_out_of_range_raise(bad):
    with pytest.raises(ValueError, match=f"TwoTowerConfig\n{next(iter(bad))}"):
        TwoTowerConfig(**bad)


def test_params_must_match_the_split(hand_split):
    with pytest.raises(ValueError, match="text_buckets"):
        train_two_tower(hand_split, TwoTowerConfig(text_buckets=64))


# ---------------------------------------------------------------- ML-100K
@pytest.mark.slow
def test_two_tower_beats_popularity_on_ml100k(recbole_wheel):
    from qarm_core.ingest import read_ml100k

    inter, items = read_ml100k(recbole_wheel)
    params = TwoTowerConfig()
    split = time_split(inter, items, params)
    model = train_two_tower(split, params)
    r = evaluate_recall(model, split, k=50)
    print(f"ML-100K recall@50: two-tower {r['recall_two_tower']:.3f}, popularity "
          f"{r['recall_popularity']:.3f}, {r['n_users']} users, trained in {model.train_seconds:.1f}s")
    assert r["n_users"] > 900
    assert r["recall_two_tower"] > 1.5 * r["recall_popularity"]       # measured 0.46 vs 0.19
    pairs = u2i_pairs(model, split)
    assert 0 < pairs.num_rows <= params.top_m * len(split.window_pos)


def test_recall_on_a_sample_of_users(trained):
    """recall_max_users: a seeded sample of the held-out users, its size and 95% interval reported;
    a cap above the holdout changes nothing."""
    split, model = trained
    full = evaluate_recall(model, split, k=5)
    assert evaluate_recall(model, split, k=5, max_users=len(split.holdout_pos)) == full
    m = len(split.holdout_pos) // 2
    a, b = evaluate_recall(model, split, k=5, max_users=m), evaluate_recall(model, split, k=5, max_users=m)
    assert a == b and a["n_users"] == m and a["n_users_held_out"] == full["n_users"]
    assert a["recall_two_tower_ci95"] > full["recall_two_tower_ci95"] > 0
    assert abs(a["recall_two_tower"] - full["recall_two_tower"]) <= a["recall_two_tower_ci95"]


def test_lazy_adamw_step_moves_and_decays_only_the_rows_a_batch_touched():
    """The id table's update: untouched rows keep their values bit for bit (lazy Adam); touched rows
    get Adam's step and the decoupled decay lr * weight_decay of AdamW."""
    import torch

    from qarm_core.pairs.two_tower import _lazy_adamw_step

    torch.manual_seed(0)
    emb = torch.nn.Embedding(6, 4, sparse=True)
    before = emb.weight.detach().clone()
    opt = torch.optim.SparseAdam([emb.weight], lr=0.1)
    # gradient 1 on every coordinate of rows 1 and 4, none elsewhere
    emb(torch.tensor([1, 4])).sum().backward()
    _lazy_adamw_step(opt, emb.weight, torch.tensor([1, 4]), weight_decay=0.5)
    after = emb.weight.detach()
    untouched = [0, 2, 3, 5]
    assert torch.equal(after[untouched], before[untouched])
    # Adam's first step moves each coordinate by lr (gradient 1 everywhere), then the decay
    assert torch.allclose(after[[1, 4]], (before[[1, 4]] - 0.1) * (1 - 0.1 * 0.5), atol=1e-6)


# ---------------------------------------------------------------- saved and reused towers
def test_saved_towers_reused_on_the_same_split_give_the_same_vectors_and_pairs(trained, tmp_path):
    split, model = trained
    save_towers(model, tmp_path)
    saved = load_towers(tmp_path)
    again, unseen = reuse_towers(saved, split, SMALL)
    assert unseen == 0
    np.testing.assert_array_equal(again.item_embeddings(), model.item_embeddings())
    assert u2i_pairs(again, split).equals(u2i_pairs(model, split))
    other = tmp_path / "again"
    other.mkdir()
    save_towers(again, other)                                   # the same model, the same bytes
    for f in ("towers.safetensors", "item_ids.npy", "towers.json"):
        assert (other / f).read_bytes() == (tmp_path / f).read_bytes()


def test_reused_towers_on_a_grown_catalog_keep_old_items_and_place_new_ones_by_text(synth, trained, tmp_path):
    inter, items = synth
    split, model = trained
    save_towers(model, tmp_path)
    old_ids = items["item_id"].to_numpy()
    new_ids = np.arange(old_ids.max() + 1, old_ids.max() + 4)
    # new items with the same title and tags as an old one: by their text alone their vectors agree
    extra = items.take(pa.array([0, 0, 0]))
    extra = extra.set_column(extra.schema.get_field_index("item_id"), "item_id", pa.array(new_ids, pa.int64()))
    grown = pa.concat_tables([items, extra])
    events = inter.take(pa.array([0, 0, 0]))
    for name, values in (("item_id", new_ids), ("ts", inter["ts"].to_numpy().max() + 1 + np.arange(3))):
        i = events.schema.get_field_index(name)
        events = events.set_column(i, name, pa.array(values, events.schema.field(name).type))
    day1 = pa.concat_tables([inter, events])
    split1 = time_split(day1, grown, SMALL)
    reused, unseen = reuse_towers(load_towers(tmp_path), split1, SMALL)
    assert unseen == 3 and split1.n_items == split.n_items + 3
    emb0, emb1 = model.item_embeddings(), reused.item_embeddings()
    at = np.searchsorted(split1.item_ids, split.item_ids)
    np.testing.assert_allclose(emb1[at], emb0, atol=1e-6)         # old items: the published vectors
    new_rows = np.searchsorted(split1.item_ids, new_ids)
    np.testing.assert_allclose(emb1[new_rows[1:]], np.repeat(emb1[new_rows[:1]], 2, 0), atol=1e-6)
    assert not np.allclose(emb1[new_rows[0]], emb1[at[0]])      # the mean id row, not the old item's
    pairs, report, used = mine_u2i_pairs(day1, grown, SMALL, k=10, published=load_towers(tmp_path))
    assert report["reused"] == 1 and report["items_unseen"] == 3 and report["train_seconds"] == 0.0
    np.testing.assert_allclose(used.item_embeddings(), emb1, atol=1e-6)
    assert pairs.num_rows == report["n_pairs"] > 0


def test_towers_trained_under_other_settings_are_not_reused(synth, trained, tmp_path):
    split, model = trained
    save_towers(model, tmp_path)
    saved = load_towers(tmp_path)
    assert reuse_blocker(saved, SMALL) is None
    # mining and measuring settings do not block; a model setting does, and is named
    assert reuse_blocker(saved, TwoTowerConfig(**{**SMALL.__dict__, "top_m": 1, "recall_k": 5, "reuse_model": True})) is None
    for field, value in (("hidden", 48), ("lr", 1e-3), ("seed", 7), ("history_len", 4)):
        assert field in MODEL_FIELDS
        why = reuse_blocker(saved, TwoTowerConfig(**{**SMALL.__dict__, field: value}))
        assert why is not None and field in why
    with pytest.raises(ValueError, match="hidden"):
        reuse_towers(saved, split, TwoTowerConfig(**{**SMALL.__dict__, "hidden": 48}))
    # towers whose positives were other events (another rating threshold) are not reused either
    assert reuse_blocker(saved, SMALL, 4.0) is None
    assert "positive_min_rating 4.0 -> 3.0" in reuse_blocker(saved, SMALL, 3.0)
    other = TwoTowerConfig(**{**SMALL.__dict__, "epochs": 1})
    _, report, _ = mine_u2i_pairs(*synth, other, k=10, published=saved)
    assert report["reused"] == 0 and report["train_seconds"] > 0
    _, report, _ = mine_u2i_pairs(*synth, SMALL, k=10, published=saved, min_rating=3.0)
    assert report["reused"] == 0


def test_an_unreadable_or_inconsistent_towers_folder_is_a_data_error(synth, trained, tmp_path):
    split, model = trained
    with pytest.raises(DataError, match="two_tower"):
        load_towers(tmp_path)                                       # empty folder
    save_towers(model, tmp_path)
    np.save(tmp_path / "item_ids.npy", split.item_ids[::-1], allow_pickle=False)
    with pytest.raises(DataError, match="not sorted, distinct"):
        load_towers(tmp_path)
    np.save(tmp_path / "item_ids.npy", split.item_ids[:-1], allow_pickle=False)
    with pytest.raises(DataError, match="do not match its id table"):
        reuse_towers(load_towers(tmp_path), split, SMALL)           # the weights are read on reuse only
    save_towers(model, tmp_path)
    (tmp_path / "towers.json").write_text('{"format": 99}')
    with pytest.raises(DataError, match="format 99"):
        load_towers(tmp_path)
    save_towers(model, tmp_path)
    (tmp_path / "towers.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="unreadable two-tower model"):
        load_towers(tmp_path)
    save_towers(model, tmp_path)
    weights = tmp_path / "towers.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])                # truncated: safetensors' own error
    saved = load_towers(tmp_path)
    with pytest.raises(DataError, match="unreadable two-tower weights"):
        reuse_towers(saved, split, SMALL)
    # towers that would not be reused (other settings) train: their unreadable weights are never read
    _, report, _ = mine_u2i_pairs(*synth, TwoTowerConfig(**{**SMALL.__dict__, "epochs": 1}), k=10, published=saved)
    assert report["reused"] == 0
    with pytest.raises(DataError, match="unreadable two-tower weights"):
        mine_u2i_pairs(*synth, SMALL, k=10, published=saved)
