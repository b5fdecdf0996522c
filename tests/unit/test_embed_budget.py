"""The embed-budget benchmark's choice of step over seeds and its record of a run folder."""

from __future__ import annotations

import json

import pytest

from benchmarks.embed_budget_ml100k import RUN_FILE, choose, run_settings


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
