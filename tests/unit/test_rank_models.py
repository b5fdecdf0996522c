"""GSU searches against brute force, attention padding masks, training, bad item-side inputs."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from qarm_core.errors import DataError
from qarm_core.rank import gsu as G
from qarm_core.rank.compare import (ComparisonScores, ModelResult, add_differences, compare, comparison_score_arrays,
                                    history_groups, history_table, load_comparison_scores, other_samples,
                                    paired_bootstrap, plot_curves, pool_comparisons, pooled_reference,
                                    read_comparison_scores, weighted_auc, weighted_auc_groups)
from qarm_core.rank.metrics import auc as plain_auc
from qarm_core.rank.data import build_index, categories, prepare
from qarm_core.rank.inputs import ItemIndex, align_codes, align_embeddings, pca
from qarm_core.rank.models import MODEL_SPECS, ItemTables, RankModel, TargetAttention, masked_softmax
from qarm_core.rank.samples import build_samples
from qarm_core.rank.train import RunResult, evaluate_rows, predict, train_model
from tests.support.data import DUCK, rank_config, tiny_codes, tiny_cutoffs, tiny_embeddings, tiny_log


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
                        frozen=rng.standard_normal((n + 1, 6)).astype(np.float32),
                        tags=np.concatenate([[[0, 0]], rng.integers(0, 4, (n, 2))]), tag_vocab=4)
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
    s = build_samples(inter, index, cfg.samples, DUCK, tmp_path / "duck", tiny_cutoffs(inter),
                      negative_sets=len(cfg.train.seeds))
    data = prepare(s, index, cfg, embeddings=tiny_embeddings(), codes=tiny_codes(), items=items, models=models)
    return data, cfg, items


def test_loss_falls_and_runs_are_seeded(tmp_path):
    import torch

    data, cfg, _ = _tiny_data(tmp_path, train={"epochs": 12, "lr_grid": [0.01], "seeds": [0]})
    torch.set_num_threads(2)
    for name in ("din", "ours_sid"):
        before = torch.random.get_rng_state()
        r = train_model(name, data, cfg, seed=0)
        # training runs on rank.train.num_threads (1) and leaves the process as it was: a later
        # stage (the judge, embedding) must not inherit one thread or a reseeded RNG
        assert torch.get_num_threads() == 2 and torch.equal(torch.random.get_rng_state(), before)
        losses = [p["train_loss"] for p in r.curves]
        assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses
        # the kept model is the best validation epoch's, and it scores that epoch's validation AUC
        assert evaluate_rows(r.trained, data, data.valid_rows, 256)["auc"] == pytest.approx(
            max(p["valid_auc"] for p in r.curves)) == r.valid_metrics["auc"]
        again = train_model(name, data, cfg, seed=0)
        assert again.metrics == r.metrics


def test_compare_tunes_on_validation_and_reports_test_against_the_best_baseline(tmp_path):
    data, cfg, _ = _tiny_data(tmp_path, train={"epochs": 3, "lr_grid": [1e-3, 1e-2], "seeds": [0, 1]})
    seen = []
    c = compare(data, cfg, on_model=lambda res, row: seen.append(res.name), n_boot=50)
    assert seen == list(cfg.models) == [r["model"] for r in c.table]
    for res, row in zip(c.results, c.table):
        # the chosen lr is the best on mean validation AUC; each run kept its best validation epoch
        assert res.lr == max(res.valid_auc_by_lr, key=res.valid_auc_by_lr.get)
        for r in res.runs:
            aucs = [p["valid_auc"] for p in r.curves]
            assert r.best_epoch == 1 + int(np.argmax(aucs)) and r.valid_metrics["auc"] == max(aucs)
            assert "test_auc" not in r.curves[0]          # test is scored once, after the choice
        # seeds use different negatives: their test rows differ
        assert not np.array_equal(res.runs[0].test_rows, res.runs[1].test_rows)
        assert row["seeds"] == 2 and len(row["auc_per_seed"]) == 2
    ref = c.reference
    assert ref in {r.name for r in c.results if r.baseline}
    assert ref == max((r for r in c.results if r.baseline), key=lambda r: r.valid_auc_by_lr[r.lr]).name
    for row in c.table:
        assert (row["vs_ref"] is None) == (row["model"] == ref)
        if row["vs_ref"]:
            v = row["vs_ref"]
            assert v["lo"] <= v["diff"] <= v["hi"]
    png = plot_curves(c.curves, tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    # every retrieved item is in that sample's history window; SIM-hard by tag and by c1 differ
    hist = data.history(np.arange(len(data.target)), data.long_len)
    for kind in ("embedding", "hard:tag", "hard:c1"):
        r = data.retrieved[kind]
        assert all(set(row[row > 0]) <= set(h[h > 0]) for row, h in zip(r, hist))
    assert not np.array_equal(data.retrieved["hard:tag"], data.retrieved["hard:c1"])


def _planted_log(n_users=60, n_items=40, seed=0):
    """Users mostly pick items of their favourite group (rated 4-5) and sometimes others (rated 1-2):
    the history shows the taste and the label follows it."""
    rng = np.random.default_rng(seed)
    rows = []
    group = np.arange(n_items) % 4
    for u in range(1, n_users + 1):
        fav = u % 4
        liked, other = np.flatnonzero(group == fav), np.flatnonzero(group != fav)
        picks = np.concatenate([rng.choice(liked, 8, replace=False), rng.choice(other, 8, replace=False)])
        rng.shuffle(picks)
        t0 = 1_000_000 + int(rng.integers(0, 500))
        rows += [(u, int(i) + 100, t0 + 10 * j, float(rng.choice([4, 5]) if group[i] == fav else rng.choice([1, 2])))
                 for j, i in enumerate(picks)]
    u, i, t, r = zip(*rows)
    return pa.table({"user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()),
                     "ts": pa.array(t, pa.int64()), "rating": pa.array(r, pa.float32())})


def test_a_planted_signal_beats_shuffled_labels(tmp_path):
    """A model trained on a planted taste ranks validation samples far better than the same model
    trained on labels shuffled within the training period."""
    inter, items = _planted_log(), tiny_log()[1]
    cfg = rank_config(train={"epochs": 10, "lr_grid": [0.01], "seeds": [0], "batch_size": 32},
                      samples={"neg_per_positive": 0})
    index = build_index(inter, items)
    s = build_samples(inter, index, cfg.samples, DUCK, tmp_path / "duck", tiny_cutoffs(inter))
    data = prepare(s, index, cfg, embeddings=tiny_embeddings(), codes=tiny_codes(), items=items, models=["din_tags"])
    real = train_model("din_tags", data, cfg, 0)
    train = data.rows("train")
    shuffled = data.label.copy()
    shuffled[train] = shuffled[train][np.random.default_rng(0).permutation(len(train))]
    noise = train_model("din_tags", type(data)(**{**data.__dict__, "label": shuffled}), cfg, 0)
    assert real.valid_metrics["auc"] > noise.valid_metrics["auc"] + 0.1, (real.valid_metrics, noise.valid_metrics)


def test_weighted_auc_and_paired_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(float)
    s = np.round(y + rng.standard_normal(400), 1)          # rounded: ties
    g, n = weighted_auc_groups(s)
    assert abs(weighted_auc(g, n, y, np.ones(400)) - plain_auc(y, s)) < 1e-12
    w = rng.integers(0, 3, 400).astype(float)               # integer weights = repeated rows
    rep = np.repeat(np.arange(400), w.astype(int))
    assert abs(weighted_auc(g, n, y, w) - plain_auc(y[rep], s[rep])) < 1e-12

    class Run:                                               # the fields the bootstrap reads
        def __init__(self, seed, logits):
            self.seed, self.test_rows, self.test_logits = seed, np.arange(400), logits

    class Data:
        user_id = np.repeat(np.arange(40), 10)
        label = y

    good, noise = Run(0, y + rng.standard_normal(400)), Run(0, rng.standard_normal(400))
    better = paired_bootstrap(Data, [good], [noise], n_boot=200)
    assert better["lo"] > 0.1 and better["p_le_0"] == 0.0
    same = paired_bootstrap(Data, [good], [Run(0, good.test_logits.copy())], n_boot=200)
    assert same["diff"] == 0.0 and same["lo"] == same["hi"] == 0.0
    with pytest.raises(ValueError, match="different test rows"):
        other = Run(0, noise.test_logits)
        other.test_rows = np.arange(1, 401)
        paired_bootstrap(Data, [good], [other], n_boot=5)


class _HistoryData:
    """The fields ``history_groups`` and the bootstrap read: 40 users with 10 test rows each (5 real
    events, 5 negatives beside them); users 0-19 have 3 events before the test period, 20-39 none;
    one more user has training rows only."""

    def __init__(self, rng):
        self.user_id = np.concatenate([np.repeat(np.arange(40), 10), [40, 40]])
        self.split = np.array(["test"] * 400 + ["train"] * 2, dtype=object)
        real = np.tile([True] * 5 + [False] * 5, 40)
        self.neg_set = np.concatenate([np.where(real, -1, 0), [-1, -1]]).astype(np.int16)
        first = np.where(np.arange(40) < 20, 3, 0)                    # events before the test period
        step = np.tile(np.concatenate([np.arange(5), np.arange(5)]), 40)
        self.pos = np.concatenate([np.repeat(first, 10) + step, [0, 1]])
        self.label = np.concatenate([rng.integers(0, 2, 400), [1, 1]]).astype(np.float32)


def test_history_groups_split_test_users_by_events_before_the_test_period():
    data = _HistoryData(np.random.default_rng(0))
    g = history_groups(data)
    assert g["with_history"][:400].tolist() == [True] * 200 + [False] * 200
    assert g["without_history"][:400].tolist() == [False] * 200 + [True] * 200
    # the user with training rows only has no test-period event: in neither group
    assert not g["with_history"][400:].any() and not g["without_history"][400:].any()


def test_by_history_finds_a_gain_confined_to_users_with_history():
    """A model that ranks well only for users with a past beats the reference there (CI above 0)
    and not on the others; the overall difference mixes both."""
    rng = np.random.default_rng(1)
    data = _HistoryData(rng)
    rows, y = np.arange(400), data.label[:400]
    warm = np.arange(400) < 200

    def runs(logits_of_seed):
        return [RunResult(model="m", seed=i, metrics={"auc": 0.5}, test_rows=rows, test_logits=logits_of_seed(i))
                for i in range(3)]

    # the same model noise as the reference's plus a little of its own: the bootstrap over test users
    # measures user sampling, not differences between independently initialised models
    ref_noise = [rng.standard_normal(400) for _ in range(3)]
    ref = ModelResult("ref", 0.01, {0.01: 0.70}, runs(lambda i: ref_noise[i]), baseline=True)
    ours = ModelResult("ours", 0.01, {0.01: 0.69},
                       runs(lambda i: ref_noise[i] + np.where(warm, 2 * y, 0) + 0.2 * rng.standard_normal(400)),
                       baseline=False)
    table = [{"model": "ref"}, {"model": "ours"}]
    assert add_differences(data, [ref, ours], table, n_boot=200) == "ref"
    w, c = table[1]["by_history"]["with_history"], table[1]["by_history"]["without_history"]
    assert (w["users"], w["samples"], c["users"], c["samples"]) == (20, 200, 20, 200)
    assert w["auc_mean"] > 0.75 and w["vs_ref"]["lo"] > 0.1
    assert abs(c["auc_mean"] - 0.5) < 0.1 and c["vs_ref"]["lo"] < 0 < c["vs_ref"]["hi"]
    assert table[0]["by_history"]["with_history"]["vs_ref"] is None
    heads, cells = history_table(table)
    assert heads[1] == "test AUC, with history (20 users, 200 samples)"
    assert cells[0][2] == "reference" and cells[1][2].startswith("+")


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
    s = build_samples(inter, index, cfg.samples, DUCK, tmp_path / "duck", tiny_cutoffs(inter))
    data = prepare(s, index, cfg, embeddings=(ids, vecs), codes=tiny_codes(skip=(3,)), items=items,
                   models=["ours_sid"])
    assert data.report["items.missing_codes"] == 1
    r = train_model("ours_sid", data, cfg, 0)
    assert np.isfinite(predict(r.trained, data, data.test_rows, 64)).all() and np.isfinite(r.metrics["auc"])
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
        prepare(build_samples(*tiny_log()[:1], build_index(*tiny_log()), cfg.samples, DUCK, tmp_path / "d",
                              tiny_cutoffs(tiny_log()[0])),
                build_index(*tiny_log()), cfg, codes=tiny_codes(), models=["ours_sid"])


def _comparison(rng, data, gain: float, seeds=(0, 1, 2)) -> list:
    """A reference with noise scores and a model whose scores carry ``gain`` x label (a planted
    signal), scored on the 400 test rows of ``data``."""
    rows, y = np.arange(400), data.label[:400]

    def runs(name, logits_of_seed):
        return [RunResult(model=name, seed=i, metrics={"auc": 0.5}, lr=0.01, test_rows=rows,
                          test_logits=logits_of_seed(i)) for i in seeds]

    return [ModelResult("ref", 0.01, {0.01: 0.70}, runs("ref", lambda i: rng.standard_normal(400)), baseline=True),
            ModelResult("ours", 0.01, {0.01: 0.69}, runs("ours", lambda i: gain * y + rng.standard_normal(400)),
                        baseline=False)]


def test_comparison_scores_round_trip_through_npz_and_pool_across_comparisons(tmp_path):
    """A comparison's test scores survive np.savez and load to the same differences; two comparisons
    (e.g. two pipeline seeds) on the same samples pool into one bootstrap over all six runs: a small
    gain present in both stays above 0 pooled with the runs resampled, and the per-comparison
    differences are each comparison's own."""
    rng = np.random.default_rng(3)
    data = _HistoryData(rng)
    first, second = _comparison(rng, data, 0.35), _comparison(rng, data, 0.35)
    path = tmp_path / "s.npz"
    np.savez_compressed(path, **comparison_score_arrays(data, first, "ref"))
    loaded = read_comparison_scores(path)
    assert loaded.reference == "ref" and [r.seed for r in loaded.runs["ours"]] == [0, 1, 2]
    assert np.array_equal(loaded.runs["ours"][1].test_logits, first[1].runs[1].test_logits.astype(np.float32))
    alone = paired_bootstrap(data, first[1].runs, first[0].runs, n_boot=300)
    ref, rows = pool_comparisons([loaded], n_boot=300)
    assert ref == "ref" and rows[1]["vs_ref"]["diff"] == pytest.approx(alone["diff"], abs=1e-6)
    other = load_comparison_scores(comparison_score_arrays(data, second, "ref"))
    ref, rows = pool_comparisons([loaded, other], n_boot=300)
    ours = rows[1]
    assert ours["runs"] == 6 and rows[0]["vs_ref"] is None and rows[0]["per_set"] is None
    assert ours["per_set"][0] == pytest.approx(alone["diff"], abs=1e-6)
    assert ours["vs_ref"]["diff"] == pytest.approx(np.mean(ours["per_set"]), abs=1e-6)
    assert ours["vs_ref"]["lo"] > 0
    # the runs resampled too (default) widen the interval over the one for these six runs' models
    _, fixed = pool_comparisons([loaded, other], n_boot=300, resample_runs=False)
    assert fixed[1]["vs_ref"]["diff"] == ours["vs_ref"]["diff"]
    assert ours["vs_ref"]["hi"] - ours["vs_ref"]["lo"] > fixed[1]["vs_ref"]["hi"] - fixed[1]["vs_ref"]["lo"]


def test_pooled_comparisons_split_test_users_by_history_as_one_comparison_does(tmp_path):
    """The history groups travel in the scores file; pooling one comparison gives its own per-group
    table (``add_differences``' ``by_history``); a file without groups (before they were recorded)
    pools without them, and with one that has them, by that one's."""
    rng = np.random.default_rng(8)
    data = _HistoryData(rng)
    results = _comparison(rng, data, 0.5)
    table = [{"model": r.name} for r in results]
    assert add_differences(data, results, table, n_boot=200) == "ref"
    path = tmp_path / "s.npz"
    np.savez(path, **comparison_score_arrays(data, results, "ref"))
    loaded = read_comparison_scores(path)
    groups = history_groups(data)
    assert {g: m.tolist() for g, m in loaded.groups.items()} == {g: m[:400].tolist() for g, m in groups.items()}
    _, rows = pool_comparisons([loaded], n_boot=200, resample_runs=False)
    for row, pooled in zip(table, rows):
        assert pooled["by_history"].keys() == row["by_history"].keys() == {"with_history", "without_history"}
        for g, v in row["by_history"].items():
            p = pooled["by_history"][g]
            assert (p["users"], p["samples"]) == (v["users"], v["samples"]) == (20, 200)
            assert p["auc_mean"] == pytest.approx(v["auc_mean"], abs=1e-6)
            assert (p["vs_ref"] is None) == (v["vs_ref"] is None) == (row["model"] == "ref")
            if v["vs_ref"]:
                assert p["vs_ref"] == pytest.approx(v["vs_ref"], abs=1e-6)
    with np.load(path, allow_pickle=False) as z:
        old = {k: z[k] for k in z.files if not k.startswith("group")}
    old = load_comparison_scores(old)
    assert old.groups == {}
    assert all(r["by_history"] == {} for r in pool_comparisons([old], n_boot=200)[1])
    _, both = pool_comparisons([old, loaded], n_boot=200)
    assert both[1]["by_history"]["with_history"]["users"] == 20
    heads, cells = history_table(both)
    assert heads[1].startswith("test AUC, with history (20 users, 200 samples)") and cells[0][2] == "reference"


def test_the_pooled_reference_is_the_best_baseline_on_validation_averaged_over_the_comparisons():
    """Two comparisons whose references differ (a baseline that reads the pipeline's embeddings won
    validation on one snapshot only): the pool's reference is the baseline with the best mean
    validation AUC, whatever each comparison chose; older files (no validation AUCs) pool only when
    their references agree, or with one named."""
    rng = np.random.default_rng(9)
    data = _HistoryData(rng)

    def comparison(valid_b: float, reference: str):
        res = _comparison(rng, data, 0.5)
        res.insert(1, ModelResult("b", 0.01, {0.01: valid_b}, res[0].runs, baseline=True))
        return load_comparison_scores(comparison_score_arrays(data, res, reference))

    first, second = comparison(0.69, "ref"), comparison(0.72, "b")           # "ref" is 0.70 in both
    assert first.valid_auc == {"ref": 0.70, "b": 0.69, "ours": 0.69} and first.baselines == ("ref", "b")
    ref, why = pooled_reference([first, second])
    assert ref == "b" and why.startswith("the best baseline by validation AUC averaged over the 2 comparisons")
    assert "ref 0.7000, b 0.7050" in why
    assert pool_comparisons([first, second], n_boot=100)[0] == "b"
    assert pooled_reference([first, comparison(0.60, "ref")])[0] == "ref"
    old = [ComparisonScores(t.user_id, t.label, t.runs, t.reference) for t in (first, second)]   # no valid AUCs
    with pytest.raises(ValueError, match=r"chose different references \(b, ref\).*name the reference"):
        pool_comparisons(old, n_boot=100)
    assert pool_comparisons(old, "ref", n_boot=100)[0] == "ref"
    assert pooled_reference([old[0], old[0]]) == ("ref", "the best baseline on validation of every comparison")
    with pytest.raises(ValueError, match="no baseline is in every comparison"):
        pooled_reference([first, ComparisonScores(first.user_id, first.label, {"ours": first.runs["ours"]}, None,
                                                  valid_auc={"ours": 0.7})])


def test_paired_bootstrap_draws_one_resample_of_users_for_all_seeds():
    """The seeds score the same test users: three copies of one seed's runs give exactly that seed's
    interval (independent draws per seed would have narrowed it by about sqrt(3))."""
    rng = np.random.default_rng(6)
    data = _HistoryData(rng)
    rows, y = np.arange(400), data.label[:400]
    a = RunResult(model="a", seed=0, metrics={}, test_rows=rows, test_logits=0.3 * y + rng.standard_normal(400))
    b = RunResult(model="b", seed=0, metrics={}, test_rows=rows, test_logits=rng.standard_normal(400))
    one = paired_bootstrap(data, [a], [b], n_boot=300)
    assert paired_bootstrap(data, [a, a, a], [b, b, b], n_boot=300) == one
    assert one["lo"] < one["diff"] < one["hi"]


def test_pool_refuses_other_samples_and_a_missing_reference():
    rng = np.random.default_rng(4)
    data = _HistoryData(rng)
    a = load_comparison_scores(comparison_score_arrays(data, _comparison(rng, data, 1.0), "ref"))
    flipped = _HistoryData(np.random.default_rng(5))                       # other labels on the same rows
    b = load_comparison_scores(comparison_score_arrays(flipped, _comparison(rng, flipped, 1.0), "ref"))
    with pytest.raises(ValueError, match="other ranking samples"):
        pool_comparisons([a, b])
    # the check `--pool-with` runs before training: against the samples themselves
    assert not other_samples(data.user_id, data.label, a) and other_samples(flipped.user_id, flipped.label, a)
    assert other_samples(data.user_id[:100], data.label[:100], a)           # rows the samples do not have
    with pytest.raises(ValueError, match="reference 'din' is not in every comparison"):
        pool_comparisons([a], reference="din")
    with pytest.raises(ValueError, match="nothing to pool"):
        pool_comparisons([])


def test_read_comparison_scores_says_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    for path in (bad, tmp_path / "missing.npz"):
        with pytest.raises(ValueError, match="not a comparison's test scores"):
            read_comparison_scores(path)
    np.savez(tmp_path / "other.npz", x=np.arange(3))                        # an npz, but not of a comparison
    with pytest.raises(ValueError, match="not a comparison's test scores.*rows"):
        read_comparison_scores(tmp_path / "other.npz")
