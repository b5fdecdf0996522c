"""GSU searches against brute force, attention padding masks, training, bad item-side inputs."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from qarm_core.errors import DataError
from qarm_core.rank import gsu as G
from qarm_core.rank.compare import compare, plot_curves
from qarm_core.rank.data import build_index, categories, prepare
from qarm_core.rank.inputs import ItemIndex, align_codes, align_embeddings, pca
from qarm_core.rank.models import MODEL_SPECS, ItemTables, RankModel, TargetAttention, masked_softmax
from qarm_core.rank.samples import build_samples
from qarm_core.rank.train import evaluate_rows, predict, train_model
from tests.support.data import DUCK, rank_config, tiny_codes, tiny_embeddings, tiny_log


def _random_histories(rng, b, length, n_items):
    lens = rng.integers(0, length + 1, b)
    hist = rng.integers(1, n_items + 1, (b, length))
    hist[np.arange(length)[None, :] < (length - lens)[:, None]] = 0      # right-aligned, 0-padded
    return hist


def test_soft_topk_equals_brute_force_on_both_routes():
    rng = np.random.default_rng(0)
    n, d, b, length, k = 60, 6, 37, 25, 7
    vecs = np.vstack([np.zeros((1, d)), rng.standard_normal((n, d))]).astype(np.float32)
    hist = _random_histories(rng, b, length, n)
    targets = rng.integers(1, n + 1, b)
    ref = G.brute_force_topk(vecs[targets], hist, vecs, k)
    for budget in (1 << 30, 0):          # score-table route, then gathered-vectors route
        out = G.search_samples(targets, lambda rows: hist[rows], k, chunk_rows=8, item_vecs=vecs,
                               table_budget_bytes=budget)
        for row, want in zip(out, ref):
            assert row[:len(want)].tolist() == want and (row[len(want):] == 0).all()
    items, scores = G.soft_topk(torch.from_numpy(vecs[targets]), torch.from_numpy(hist), torch.from_numpy(vecs), k)
    assert [r[r > 0].tolist() for r in items.numpy()] == ref
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_hard_topk_is_most_recent_same_category():
    rng = np.random.default_rng(1)
    n, b, length, k = 30, 20, 15, 4
    cat = np.concatenate([[0], rng.integers(0, 4, n)])       # category 0 = none: never matches
    hist = _random_histories(rng, b, length, n)
    targets = rng.integers(1, n + 1, b)
    out = G.search_samples(targets, lambda rows: hist[rows], k, chunk_rows=6, item_cat=cat)
    for row, h, t in zip(out, hist, targets):
        want = [int(i) for i in h[::-1] if i > 0 and cat[i] == cat[t] and cat[t] > 0][:k]
        assert row[:len(want)].tolist() == want and (row[len(want):] == 0).all()


def test_history_window_and_nearest_items():
    seq = np.array([0, 5, 6, 7, 8, 9, 3, 4])      # user A: 5..9 at 1..5, user B: 3, 4 at 6..7
    h = G.history_window(seq, np.array([1, 1, 6, 6]), np.array([3, 0, 2, 1]), 4)
    assert h.tolist() == [[0, 5, 6, 7], [0, 0, 0, 0], [0, 0, 3, 4], [0, 0, 0, 3]]
    vecs = np.array([[0, 0], [1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    nb = G.nearest_items(vecs, 2)
    assert nb[0].tolist() == [0, 0] and nb[1, 0] == 2 and nb[3, 0] == 4 and 1 not in nb[1].tolist()


def test_masked_softmax_and_attention_ignore_padding():
    torch.manual_seed(0)
    att = TargetAttention(8, 16)
    t = torch.randn(5, 8)
    keys = torch.randn(5, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1],
                         [0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    out = att(t, keys, mask)
    noisy = torch.where(mask.unsqueeze(-1), keys, 100 * torch.randn_like(keys))
    assert torch.allclose(att(t, noisy, mask), out, atol=1e-6)
    assert torch.equal(out[3], torch.zeros(8))                    # empty history: zero interest
    w = masked_softmax(torch.randn(5, 6), mask)
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    assert torch.allclose(w.sum(1), mask.any(1).float())


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_model_output_ignores_padded_positions(name):
    rng = np.random.default_rng(2)
    n = 40
    codes = np.concatenate([[[0, 0, 0]], rng.integers(1, 5, (n, 3))])
    tables = ItemTables(n, codes=codes, code_vocab=np.array([5, 5, 5]),
                        neighbours=np.concatenate([[[0, 0, 0]], rng.integers(1, n + 1, (n, 3))]),
                        frozen=rng.standard_normal((n + 1, 6)).astype(np.float32))
    torch.manual_seed(0)
    m = RankModel(MODEL_SPECS[name], tables, dim=8, att_hidden=8, mlp_hidden=[16], top_k=4).eval()
    b = 6
    short = torch.from_numpy(_random_histories(rng, b, 5, n))
    long_ = torch.from_numpy(_random_histories(rng, b, 12, n))
    short[0] = 0
    long_[0] = 0                                                   # one empty history
    batch = {"target": torch.from_numpy(rng.integers(1, n + 1, b)), "short": short, "long": long_,
             "retrieved": long_[:, -4:].clone()}
    out = m(batch)
    assert out.shape == (b,) and torch.isfinite(out).all()
    # padding stays padding (item 0); what the item tables hold at row 0 must not matter
    with torch.no_grad():
        m.items.id.weight[0].normal_()
    assert torch.allclose(m(batch), out, atol=1e-6)


def _tiny_data(tmp_path, models=None, **cfg_over):
    inter, items = tiny_log()
    cfg = rank_config(**cfg_over)
    index = build_index(inter, items)
    s = build_samples(inter, index, cfg.samples, DUCK, tmp_path / "duck")
    data = prepare(s, index, cfg, embeddings=tiny_embeddings(), codes=tiny_codes(), items=items, models=models)
    return data, cfg, items


def test_loss_falls_and_runs_are_seeded(tmp_path):
    data, cfg, _ = _tiny_data(tmp_path, train={"epochs": 12, "lr": 0.01, "seeds": [0]})
    for name in ("din", "ours_sid"):
        r = train_model(name, data, cfg, seed=0)
        losses = [p["train_loss"] for p in r.curves]
        assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses
        assert evaluate_rows(r.trained, data, data.train_rows, 256)["auc"] > 0.7   # it fit the training set
        again = train_model(name, data, cfg, seed=0)
        assert again.metrics == r.metrics


def test_compare_table_and_curves(tmp_path):
    data, cfg, _ = _tiny_data(tmp_path)
    seen = []
    c = compare(data, cfg, on_model=lambda name, runs, row: seen.append(name))
    assert seen == list(cfg.models) == [r["model"] for r in c.table]
    for row in c.table:
        assert 0 <= row["auc_mean"] <= 1 and row["auc_std"] >= 0 and row["seeds"] == 2
        assert len(row["auc_per_seed"]) == 2
    assert all(len(per_seed) == 2 and len(per_seed[0]) == cfg.train.epochs for per_seed in c.curves.values())
    png = plot_curves(c.curves, tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    # every retrieved item is in that sample's history window
    hist = data.history(np.arange(len(data.target)), data.long_len)
    for kind in ("embedding", "hard"):
        r = data.retrieved[kind]
        assert all(set(row[row > 0]) <= set(h[h > 0]) for row, h in zip(r, hist))


def test_items_without_codes_or_embeddings(tmp_path):
    inter, items = tiny_log()
    index = build_index(inter, items)
    codes, vocab, missing = align_codes(index, tiny_codes(skip=(3, 9)))
    assert missing == 2 and (codes[index.lookup(np.array([103, 109]), "t")] == 0).all()
    assert (codes[1:][np.isin(index.item_ids, [103, 109], invert=True)] > 0).all()
    assert vocab.tolist() == [5, 4, 12]
    with pytest.raises(DataError, match=r"\[stage=rank, dataset=codes\] 2 item\(s\) .* no Semantic ID.*103"):
        align_codes(index, tiny_codes(skip=(3, 9)), missing="error")
    ids, vecs = tiny_embeddings()
    with pytest.raises(DataError, match=r"dataset=embeddings\] 1 item\(s\) .* no embedding.*\[105\]"):
        align_embeddings(index, ids[ids != 105], vecs[ids != 105])
    e, n_missing = align_embeddings(index, ids[ids != 105], vecs[ids != 105], missing="zero")
    assert n_missing == 1 and not e[index.lookup(np.array([105]), "t")].any()
    bad = vecs.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        align_embeddings(index, ids, bad)
    with pytest.raises(DataError, match="duplicate item ids"):
        align_codes(index, pa.concat_tables([tiny_codes(), tiny_codes()]))
    # a model run with items lacking codes still trains (reserved index), the report counts them
    cfg = rank_config(train={"epochs": 1, "seeds": [0]})
    s = build_samples(inter, index, cfg.samples, DUCK, tmp_path / "duck")
    data = prepare(s, index, cfg, embeddings=(ids, vecs), codes=tiny_codes(skip=(3,)), items=items,
                   models=["ours_sid"])
    assert data.report["items.missing_codes"] == 1
    r = train_model("ours_sid", data, cfg, 0)
    assert np.isfinite(predict(r.trained, data, data.test_rows, 64)).all() and 0 <= r.metrics["auc"] <= 1
    with pytest.raises(DataError, match="need Semantic-ID codes"):
        prepare(s, index, cfg, embeddings=(ids, vecs), codes=None, models=["ours_sid"])
    with pytest.raises(DataError, match="need embeddings"):
        prepare(s, index, cfg, embeddings=None, codes=tiny_codes(), models=["ours_nosid"])
    with pytest.raises(DataError, match="unknown model"):
        train_model("nope", data, cfg, 0)


def test_sim_hard_by_tag_and_pca():
    inter, items = tiny_log()
    index = build_index(inter, items)
    cat = categories(index, items, None, "tag")
    assert cat[0] == 0 and cat[index.lookup(np.array([100]), "t")][0] == 0      # item 0 has no tags
    g = (index.item_ids - 100) % 4
    has = (index.item_ids - 100) % 7 != 0
    assert len(set(zip(g[has], cat[1:][has]))) == 4                             # one category per genre
    x = np.vstack([np.zeros((1, 5)), np.random.default_rng(0).standard_normal((20, 5))]).astype(np.float32)
    p = pca(x, 2)
    assert p.shape == (21, 2) and not p[0].any()
    assert pca(x, None) is x or np.array_equal(pca(x, None), x)
    with pytest.raises(DataError, match="unknown item id"):
        ItemIndex(np.array([1, 2])).lookup(np.array([3]), "samples")


def test_frozen_embedding_option_adds_projected_vectors(tmp_path):
    data, cfg, _ = _tiny_data(tmp_path, models=["ours_sid"], model={"frozen_embedding": True},
                              train={"epochs": 1, "seeds": [0]})
    assert data.tables.frozen is not None and data.tables.frozen.shape == (data.index.n + 1, 8)
    r = train_model("ours_sid", data, cfg, 0)
    assert r.trained.items.frozen and r.trained.items.proj.weight.shape == (8, 8)
    with pytest.raises(DataError, match="need embeddings"):
        prepare(build_samples(*tiny_log()[:1], build_index(*tiny_log()), cfg.samples, DUCK, tmp_path / "d"),
                build_index(*tiny_log()), cfg, codes=tiny_codes(), models=["ours_sid"])
