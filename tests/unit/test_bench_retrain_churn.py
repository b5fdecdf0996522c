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
