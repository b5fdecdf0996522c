"""Tiny seeded tables shared by the tests (real tables, no mocks): the embedding catalog and the
ranking log, and the small DuckDB settings the tests run under."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from qarm_core.base import DuckDBConfig
from qarm_core.rank.config import RankConfig
from qarm_core.split import Cutoffs, SplitConfig, resolve_cutoffs

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


def rank_config(**overrides) -> RankConfig:
    base = {"samples": {"long_len": 16, "short_len": 4},
            "gsu": {"top_k": 5, "pca_dim": None, "chunk_rows": 7},
            "model": {"dim": 8, "att_hidden": 8, "mlp_hidden": [16], "vq_neighbours": 3, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 64, "seeds": [0, 1], "num_threads": 1}}
    for k, v in overrides.items():
        base[k] = {**base.get(k, {}), **v}
    return RankConfig.model_validate(base)


def tiny_cutoffs(inter: pa.Table, **split) -> Cutoffs:
    """The pipeline's split (default fractions, or ``split`` overrides) of a log."""
    return resolve_cutoffs(inter["ts"].to_numpy(), SplitConfig(**split))


GENRES = ["Action", "Comedy", "Drama", "Horror"]


def tiny_catalog(n: int = 24) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(items, judgments, qa): items 1..n in 4 genres; kept pairs = same genre, one rejected pair."""
    items = pa.table({"item_id": pa.array(range(1, n + 1), pa.int64()),
                      "title": [f"Movie {i}" for i in range(1, n + 1)],
                      "year": pa.array([1990 + i % 7 for i in range(n)], pa.int32()),
                      "tags": [[GENRES[i % 4]] for i in range(n)]})
    src, dst = [], []
    for i in range(1, n + 1):
        for j in range(1, n + 1):
            if i != j and (i - 1) % 4 == (j - 1) % 4:
                src.append(i)
                dst.append(j)
    src.append(1)
    dst.append(2)              # different genres, rejected by the judge
    judgments = pa.table({"src_item": pa.array(src, pa.int64()), "dst_item": pa.array(dst, pa.int64()),
                          "keep": [True] * (len(src) - 1) + [False]})
    qa = pa.table({"item_id": pa.array(list(range(1, n + 1)) * 2, pa.int64()),
                   "qa_index": pa.array([0] * n + [1] * n, pa.int32()),
                   "question": ["What genre is it?"] * n + ["When was it released?"] * n,
                   "answer": [f"It is {GENRES[i % 4]}." for i in range(n)] + [f"In {1990 + i % 7}." for i in range(n)]})
    return items, judgments, qa
