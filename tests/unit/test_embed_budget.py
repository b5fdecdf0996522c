"""The embed-budget benchmark's choice of step over seeds, its record of a run folder, its paired
recall difference and the saved models that compare_recipes.py reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.embed_budget_ml100k import RUN_FILE, choose, run_settings

REPO = Path(__file__).resolve().parents[2]


def _row(seed: int, step: int, valid: float, lr: float = 1e-4) -> dict:
    return {"lr": lr, "seed": seed, "step": step, "valid.recall_at_10": valid}


def test_choose_averages_validation_over_seeds_and_only_where_every_seed_measured():
    rows = [_row(0, 600, 0.0290), _row(0, 800, 0.0278), _row(0, 1200, 0.0308),
            _row(1, 600, 0.0295), _row(1, 800, 0.0307), _row(1, 1200, 0.0287),
            _row(1, 1400, 0.0400)]                      # one seed only: not a candidate
    best, means = choose(rows)
    assert best == (1e-4, 1200)
    assert set(means) == {(1e-4, 600), (1e-4, 800), (1e-4, 1200)}
    assert means[(1e-4, 1200)] == pytest.approx(0.02975)
    # each seed alone would choose differently: the mean decides, not the best single seed
    assert choose([r for r in rows if r["seed"] == 1])[0] == (1e-4, 1400)
    assert choose([r for r in rows if r["seed"] == 0])[0] == (1e-4, 1200)


def test_choose_breaks_ties_toward_fewer_steps():
    rows = [_row(0, 600, 0.03), _row(0, 800, 0.03), _row(1, 600, 0.02), _row(1, 800, 0.02)]
    assert choose(rows)[0] == (1e-4, 600)


def test_run_settings_read_the_record_else_the_training_log(tmp_path):
    with pytest.raises(SystemExit, match="no train_log.jsonl"):
        run_settings(tmp_path)
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 599, "max_steps": 600}) + "\n"
                                              + json.dumps({"step": 600, "max_steps": 600}) + "\n")
    assert run_settings(tmp_path) == {"start_max_steps": 600, "seed": None, "lr": None}
    (tmp_path / RUN_FILE).write_text(json.dumps({"start_max_steps": 600, "seed": 0, "lr": 1e-4}))
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1200, "max_steps": 1200}) + "\n")
    assert run_settings(tmp_path) == {"start_max_steps": 600, "seed": 0, "lr": 1e-4}   # a continued run


def _paired_events(n_pairs: int, users: int, seed: int):
    """Each user likes the two items of one pair one right after the other: item 2i then 2i + 1."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    u, it, ts = [], [], []
    for user, i in enumerate(rng.integers(0, n_pairs, users)):
        u += [user, user]
        it += [2 * i, 2 * i + 1]
        ts += [0, 1]
    return pa.table({"user_id": np.array(u, np.int64), "item_id": np.array(it, np.int64),
                     "ts": np.array(ts, np.int64), "rating": np.full(len(u), 5.0)})


def _recipe(n_pairs: int, together: bool, seed: int) -> tuple:
    """(item_ids, vectors): with ``together`` the two items of a pair share a direction, else random."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = np.arange(2 * n_pairs, dtype=np.int64)
    base = rng.normal(size=(n_pairs, 16))
    x = np.repeat(base, 2, axis=0) + 0.05 * rng.normal(size=(2 * n_pairs, 16)) if together \
        else rng.normal(size=(2 * n_pairs, 16))
    return ids, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_recall_difference_of_two_recipes_each_averaged_over_its_seeds():
    import numpy as np

    from benchmarks.embed_budget_ml100k import recall_difference_ci

    n = 60
    data = {"events": {"valid": _paired_events(n, 40, 1), "test": _paired_events(n, 40, 2)},
            "train_items": np.arange(2 * n, dtype=np.int64)}
    good = [_recipe(n, True, s) for s in (0, 1)]
    noise = [_recipe(n, False, s) for s in (2, 3)]
    d = recall_difference_ci(good, noise, data, 4.0, k=5)
    assert d["lo"] > 0.5 and d["diff"] > d["lo"]              # pairs together vs random: far apart
    back = recall_difference_ci(noise, good, data, 4.0, k=5)
    assert back["diff"] == pytest.approx(-d["diff"])
    same = recall_difference_ci(good, list(reversed(good)), data, 4.0, k=5, period="valid")
    assert same["diff"] == same["lo"] == same["hi"] == 0.0   # the same models: no difference, no spread
    # a single model on either side is a recipe of one seed
    one = recall_difference_ci(good[0], noise, data, 4.0, k=5)
    assert one["pairs"] == d["pairs"] and one["lo"] > 0.5


def test_saved_vectors_are_read_back_per_recipe_and_step(tmp_path):
    import numpy as np

    from benchmarks.compare_recipes import recipe_runs
    from benchmarks.embed_budget_ml100k import save_vectors

    ids, x = _recipe(5, True, 0)
    for seed in (0, 1):
        save_vectors(tmp_path, 1e-4, seed, 1200, ids, x + seed)
    save_vectors(tmp_path, 1e-4, 0, 800, ids, x)
    runs = recipe_runs(tmp_path, 1200)
    assert sorted(runs) == [0, 1]
    np.testing.assert_array_equal(runs[1][0], ids)
    np.testing.assert_allclose(runs[1][1], x + 1)
    assert not list(tmp_path.glob("*.tmp.npz"))
    with pytest.raises(SystemExit, match="no saved model at step 400"):
        recipe_runs(tmp_path, 400)
    save_vectors(tmp_path, 3e-4, 2, 1200, ids, x)             # another learning rate is another recipe
    with pytest.raises(SystemExit, match="several learning rates"):
        recipe_runs(tmp_path, 1200)


def test_compare_recipes_takes_a_folder_at_its_own_step_or_a_baseline_as_b():
    from benchmarks.compare_recipes import parse_args

    common = ["--home", "H", "--a", "A", "--step", "800"]
    same = parse_args(common + ["--b", "B"])
    assert same.step_b == 800 and same.label_b == "B" and same.baseline is None
    later = parse_args(common + ["--b", "A", "--step-b", "1200", "--label-a", "f800", "--label-b", "f1200"])
    assert (later.step, later.step_b, later.label_b) == (800, 1200, "f1200")
    base = parse_args(common + ["--baseline", "minilm"])
    assert base.b is None and base.label_b == "minilm"
    for bad in (common,                                          # no B
                common + ["--b", "B", "--baseline", "base"],     # two Bs
                common + ["--baseline", "base", "--step-b", "1200"],  # a baseline has no step
                common + ["--b", "B", "--label-b", "A"],         # both sides labelled A
                common + ["--baseline", "e5"]):                  # not a baseline of the pipeline
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_baselines_embeds_only_the_ones_asked_for(tiny_catalog, tmp_path):
    """compare_recipes' --baseline minilm embeds MiniLM, not the base LLM as well; asked again,
    the finished catalog is read back (the same vectors)."""
    import numpy as np

    from benchmarks.embed_budget_ml100k import _baselines
    from qarm_core.config import load_config

    cfg = load_config(REPO / "configs" / "ml100k.yaml", {"home": str(tmp_path / "home")})
    items, _, _ = tiny_catalog
    got = _baselines(cfg, {"items": items}, tmp_path / "work", ("minilm",))
    assert list(got) == ["minilm"] and not (tmp_path / "work" / "base").exists()
    ids, x = got["minilm"]
    assert x.shape == (items.num_rows, 384) and sorted(ids.tolist()) == sorted(items["item_id"].to_pylist())
    again = _baselines(cfg, {"items": items}, tmp_path / "work", ("minilm",))["minilm"]
    np.testing.assert_array_equal(again[1], x)
