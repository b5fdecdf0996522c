"""Embeddings and codes on disk (Parquet), and a synthetic embedding generator for benchmarks/tests."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qarm_core.errors import DataError

STAGE = "quantize"


def embeddings_schema(dim: int) -> pa.Schema:
    """item_id, vector (fixed-size list of ``dim`` float32), model_version, text_hash
    (``qarm_core.schemas.embeddings_schema``)."""
    from qarm_core.schemas import embeddings_schema as dataset_schema

    return dataset_schema(dim).schema


def embeddings_batch(item_ids: np.ndarray, x: np.ndarray, model_version: str | list[str],
                     text_hash: list[str | None] | None = None) -> pa.RecordBatch:
    """One record batch of ``embeddings_schema``: ids (n,), vectors (n, dim), the model version
    (one for all rows, or one per row) and the text hashes (None: unknown)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    versions = [model_version] * len(x) if isinstance(model_version, str) else model_version
    hashes = pa.array(text_hash, pa.string()) if text_hash is not None else pa.nulls(len(x), pa.string())
    return pa.RecordBatch.from_arrays([pa.array(item_ids, pa.int64()), vec, pa.array(versions, pa.string()), hashes],
                                      schema=embeddings_schema(x.shape[1]))


def read_embeddings(path: str | Path, dataset: str = "embeddings", only: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids ``(n,)`` int64, vectors ``(n, dim)`` float32) from a Parquet file or folder; with
    ``only``, just the rows of those item ids (read file by file: at most one file's vectors more)."""
    p = Path(path)
    if not p.exists():
        raise DataError(STAGE, dataset, f"embeddings not found: {p}")
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files:
        raise DataError(STAGE, dataset, f"no *.parquet files in {p}")
    ids, vecs = [], []
    for f in files:
        try:
            t = pq.read_table(f, columns=["item_id", "vector"])
            if only is not None and t.num_rows and pa.types.is_integer(t["item_id"].type):
                from qarm_core.arrays import member_of

                t = t.filter(pa.array(member_of(t["item_id"].to_numpy(), np.asarray(only))))
        except (pa.ArrowException, OSError, KeyError) as exc:
            raise DataError(STAGE, dataset, f"unreadable embeddings file {f} (needs columns item_id, "
                                            f"vector): {exc}") from None
        col = t["vector"].combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            dim = col.type.list_size
            flat = col.flatten().to_numpy(zero_copy_only=False)
            vecs.append(flat.astype(np.float32, copy=False).reshape(-1, dim))
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            lens = np.diff(col.offsets.to_numpy())
            if len(lens) and (lens != lens[0]).any():
                raise DataError(STAGE, dataset, f"{f}: vectors have different lengths {sorted(set(lens.tolist()))[:5]}")
            vecs.append(col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1))
        else:
            raise DataError(STAGE, dataset, f"{f}: column 'vector' has type {col.type}, expected a list of floats")
        if not pa.types.is_integer(t["item_id"].type):
            raise DataError(STAGE, dataset, f"{f}: item_id has type {t['item_id'].type}; expected integers")
        if t["item_id"].null_count:
            raise DataError(STAGE, dataset, f"{f}: null item ids")
        ids.append(t["item_id"].to_numpy().astype(np.int64))
    dims = {v.shape[1] for v in vecs if len(v)}
    if len(dims) > 1:
        raise DataError(STAGE, dataset, f"files disagree on the embedding dim: {sorted(dims)}")
    return np.concatenate(ids), np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)


def read_model_version(path: str | Path) -> str:
    """The ``model_version`` of an embeddings file or folder ("" when it has no such column or rows)."""
    p = Path(path)
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files or "model_version" not in pq.read_schema(files[0]).names:
        return ""
    col = pq.read_table(files[0], columns=["model_version"])["model_version"]
    return (col[0].as_py() or "") if len(col) else ""


def synthetic_embeddings(n: int, dim: int, *, clusters: int = 4096, seed: int = 0,
                         block: int = 1_000_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Seeded mixture of Gaussians on the unit sphere, ``(ids, x)`` blocks of ``(block, dim)``."""
    rng = np.random.default_rng([seed, 0])
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    scales = rng.uniform(0.3, 0.8, clusters).astype(np.float32)
    for start in range(0, n, block):
        m = min(block, n - start)
        r = np.random.default_rng([seed, 1, start])
        c = r.integers(0, clusters, m)
        x = centers[c] + scales[c, None] * r.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield np.arange(start, start + m, dtype=np.int64), x
