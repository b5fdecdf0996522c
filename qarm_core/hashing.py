"""Seeded, order-free pseudo-randomness: hashes of ids instead of a random stream.

A choice made by hashing (seed, ids) does not depend on which other rows are present or in what
order they come, so a daily run that adds rows keeps yesterday's choices for the rows it shares
with yesterday (samples, evaluation pairs, held-out splits).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def text_hash(text: str) -> str:
    """The key of a text in qarm's per-item caches (embeddings, the judge's neutral pass): 16 hex
    characters of blake2b."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit hash of each element (vectorised): (n,) ints -> (n,) uint64."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def keyed_hash(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """uint64 hash of (seed, key_1, ..., key_m), elementwise over broadcast int arrays."""
    arrays = np.broadcast_arrays(*[np.asarray(k, dtype=np.int64) for k in keys])
    h = splitmix64(np.full(arrays[0].shape, seed, dtype=np.int64))
    for a in arrays:
        h = splitmix64(h ^ a.astype(np.uint64))
    return h


def keyed_uniform(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """float64 in [0, 1) from ``keyed_hash``: the same keys always give the same number."""
    return (keyed_hash(seed, *keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def stable_hash(obj: Any) -> str:
    """Short content hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(blob, digest_size=10).hexdigest()
