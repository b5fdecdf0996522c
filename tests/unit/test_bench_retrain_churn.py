"""The movement statistic of benchmarks/bench_retrain_churn.py (the benchmark itself trains a model)."""

from __future__ import annotations

import numpy as np

from benchmarks.bench_retrain_churn import movement
from qarm_core.quantize.lineage import apply_input_map, fit_input_map


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_movement_removes_a_rotation_and_what_an_affine_map_takes_out_only_when_asked():
    rng = np.random.default_rng(0)
    old = _unit(rng.normal(size=(600, 16)))
    cells = rng.integers(0, 8, 600)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    turned = old @ q
    assert movement(old, turned, cells) < 1e-6 < 1.0 < movement(old, turned, cells, rotate=False)
    # a stretch is no rotation: Procrustes leaves it, the affine map takes it out
    stretched = old @ np.diag(np.geomspace(0.3, 3.0, 16)) @ q
    back = apply_input_map(stretched, fit_input_map(stretched, old, ridge=1e-9)[0])
    assert movement(old, back, cells, rotate=False) < 1e-3 < 0.3 < movement(old, stretched, cells)


def test_fidelity_scores_cells_in_the_space_given_whatever_order_the_codes_come_in():
    import pyarrow as pa
    import pytest

    from benchmarks.bench_retrain_churn import fidelity, nearest

    rng = np.random.default_rng(1)
    centres = _unit(rng.normal(size=(8, 16)))
    truth = np.repeat(np.arange(8), 50)
    x = _unit(centres[truth] + 0.05 * rng.normal(size=(400, 16)))
    ids = np.arange(1000, 1400)

    def codes(c1, c2):
        order = rng.permutation(400)                 # the table's rows in another order than x's
        return pa.table({"item_id": ids[order], "c1": c1[order].astype(np.int32), "c2": c2[order].astype(np.int32)})

    near = nearest(x)
    assert near.shape == (400, 10) and not (near == np.arange(400)[:, None]).any()   # never the row itself
    right = fidelity(x, ids, codes(truth, np.zeros(400)), near)
    shuffled = fidelity(x, ids, codes(rng.permutation(truth), np.zeros(400)), near)
    assert right["within_c1"] < 0.05 and right["knn_c1"] > 0.95
    assert shuffled["within_c1"] > 0.9 and shuffled["knn_c1"] < 0.3
    # (c1, c2) cells split each true cell in two: nothing is lost at level 1, and the spread
    # inside the finer cells cannot exceed the coarser ones'
    halves = fidelity(x, ids, codes(truth, np.arange(400) % 2), near)
    assert halves["within_c1"] == pytest.approx(right["within_c1"])
    assert halves["within_c12"] <= halves["within_c1"] and halves["knn_c12"] < right["knn_c12"]
    with pytest.raises(ValueError, match="no code"):
        fidelity(x, ids + 1, codes(truth, np.zeros(400)), near)
