"""Tiny seeded ranking data shared by the rank unit tests (real tables, no mocks; holds no tests)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from qarm_core.config import DuckDBConfig
from qarm_core.rank.config import RankConfig

DUCK = DuckDBConfig(memory_limit="256MB", max_temp_directory_size="256MB", threads=1)


def tiny_log(n_users: int = 30, n_items: int = 40, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(interactions, items): users rate 12-24 items each; each user likes one of 4 item groups,
    so the label is learnable from the history. Timestamps repeat (same-second ties)."""
    rng = np.random.default_rng(seed)
    users, items, ts, ratings = [], [], [], []
    group = np.arange(n_items) % 4
    for u in range(1, n_users + 1):
        n = int(rng.integers(12, 25))
        chosen = rng.choice(n_items, size=n, replace=False) + 100
        fav = u % 4
        t0 = 1_000_000 + int(rng.integers(0, 1000))
        for j, it in enumerate(chosen):
            users.append(u)
            items.append(int(it))
            ts.append(t0 + 10 * (j // 2))                # pairs of events share a second
            liked = group[it - 100] == fav
            ratings.append(float(rng.choice([4, 5]) if liked or rng.random() < 0.2 else rng.choice([1, 2, 3])))
    inter = pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64()),
                      "ts": pa.array(ts, pa.int64()), "rating": pa.array(ratings, pa.float32())})
    genres = ["Action", "Comedy", "Drama", "Horror"]
    cat = pa.table({"item_id": pa.array(np.arange(n_items) + 100, pa.int64()),
                    "title": [f"item {i}" for i in range(n_items)],
                    "tags": pa.array([[genres[g]] if i % 7 else [] for i, g in enumerate(group)],
                                     pa.list_(pa.string()))})
    return inter, cat


def tiny_embeddings(n_items: int = 40, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors clustered by item group (item_id - 100) % 4."""
    rng = np.random.default_rng([seed, 9])
    centres = rng.standard_normal((4, dim))
    x = centres[np.arange(n_items) % 4] + 0.3 * rng.standard_normal((n_items, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.arange(n_items, dtype=np.int64) + 100, x.astype(np.float32)


def tiny_codes(n_items: int = 40, skip: tuple[int, ...] = ()) -> pa.Table:
    ids = np.array([i for i in range(n_items) if i not in skip], np.int64)
    return pa.table({"item_id": ids + 100, "c1": pa.array(ids % 4, pa.int32()),
                     "c2": pa.array((ids // 4) % 3, pa.int32()), "c3": pa.array(ids * 37 % 11, pa.int64())})


def tiny_cfg(**overrides) -> RankConfig:
    base = {"samples": {"long_len": 16, "short_len": 4, "test_events": 3},
            "gsu": {"top_k": 5, "pca_dim": None, "chunk_rows": 7},
            "model": {"dim": 8, "att_hidden": 8, "mlp_hidden": [16], "vq_neighbours": 3, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 64, "seeds": [0, 1], "num_threads": 1}}
    for k, v in overrides.items():
        base[k] = {**base.get(k, {}), **v}
    return RankConfig.model_validate(base)
