"""Everything a ranking run reads, as dense numpy arrays: samples, sequences, GSU results, item tables.

``prepare`` runs the (frozen-embedding) searches once for every sample, so that all models and seeds
share them; ``RankData.batch`` gathers one mini-batch's tensors:

* ``target`` ``(B,)``, ``label`` ``(B,)``;
* ``short`` ``(B, short_len)``: the last events before the target, right-aligned, 0-padded;
* ``retrieved`` ``(B, top_k)``: the GSU's picks from the last ``long_len`` events (hard or embedding
  search), 0-padded;
* ``long`` ``(B, long_len)``: the long history itself, for SIM-soft, which searches it with the ID
  embeddings it is learning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from qarm_core.arrays import has_duplicates, sorted_unique
from qarm_core.errors import DataError
from qarm_core.rank import gsu as G
from qarm_core.rank.config import RankConfig
from qarm_core.rank.inputs import ItemIndex, align_codes, align_embeddings, pca
from qarm_core.rank.models import ItemTables, resolve_spec
from qarm_core.rank.samples import Samples

STAGE = "rank"


@dataclass
class RankData:
    index: ItemIndex
    seq_flat: np.ndarray            # (E,) every kept user's item indices in time order, back to back
    user_start: np.ndarray          # (n,) per sample: where its user's sequence starts in seq_flat
    user_id: np.ndarray             # (n,) per sample (GAUC groups)
    target: np.ndarray              # (n,) dense item index
    label: np.ndarray               # (n,) float32 0/1
    pos: np.ndarray                 # (n,) events before the target
    split: np.ndarray               # (n,) object: 'train' | 'valid' | 'test'
    neg_set: np.ndarray             # (n,) int16: a sampled negative's set, -1 for real events
    short_len: int
    long_len: int
    top_k: int
    tables: ItemTables
    retrieved: dict[str, np.ndarray] = field(default_factory=dict)   # gsu kind -> (n, top_k) int32
    report: dict = field(default_factory=dict)

    @property
    def negative_sets(self) -> int:
        return int(self.neg_set.max()) + 1 if len(self.neg_set) and self.neg_set.max() >= 0 else 1

    def rows(self, split: str, seed_index: int = 0) -> np.ndarray:
        """Row numbers of ``split`` ('train' | 'valid' | 'test') for the ``seed_index``-th seed: the
        real events plus negative set ``seed_index mod negative_sets`` (in time order per user)."""
        k = seed_index % self.negative_sets
        return np.flatnonzero((self.split == split) & ((self.neg_set < 0) | (self.neg_set == k)))

    @property
    def train_rows(self) -> np.ndarray:
        return self.rows("train")

    @property
    def valid_rows(self) -> np.ndarray:
        return self.rows("valid")

    @property
    def test_rows(self) -> np.ndarray:
        return self.rows("test")

    def history(self, rows: np.ndarray | slice, length: int) -> np.ndarray:
        """``(len(rows), length)`` dense indices of the events before each row's target, right-aligned."""
        return G.history_window(self.seq_flat, self.user_start[rows], self.pos[rows], length)

    def batch(self, rows: np.ndarray, gsu: str | None) -> dict[str, torch.Tensor]:
        b = {"target": torch.from_numpy(self.target[rows]),
             "label": torch.from_numpy(self.label[rows]),
             "short": torch.from_numpy(self.history(rows, self.short_len))}
        if gsu == "soft_id":
            b["long"] = torch.from_numpy(self.history(rows, self.long_len))
        elif gsu is not None:
            b["retrieved"] = torch.from_numpy(self.retrieved[gsu][rows].astype(np.int64))
        return b


def build_index(interactions: pa.Table | None, items: pa.Table | None) -> ItemIndex:
    """Dense index over the catalog (``items``) or, without one, the items of the log. With a catalog,
    every logged item must be in it (checked when samples are built)."""
    src = items if items is not None else interactions
    ids = src["item_id"].to_numpy()
    if items is not None and has_duplicates(ids):
        raise DataError(STAGE, "items", "duplicate item ids in the catalog")
    return ItemIndex(sorted_unique(ids).astype(np.int64))


def categories(index: ItemIndex, items: pa.Table | None, codes: np.ndarray | None, key: str) -> np.ndarray:
    """SIM-hard's category per dense index ``(N + 1,)``: the c1 code, or the item's first tag; 0 = none."""
    if key == "c1":
        if codes is None:
            raise DataError(STAGE, "codes", "SIM-hard on c1 (sim_hard_c1) needs codes")
        return codes[:, 0].copy()
    # the item's first tag, as the tag models index it (0 = no tag)
    return item_tags(index, items, what="SIM-hard on tags")[0][:, 0].copy()


def item_tags(index: ItemIndex, items: pa.Table | None, max_tags: int = 6,
              what: str = "the tag models (din_tags)") -> tuple[np.ndarray, int]:
    """``(N + 1, max_tags)`` tag indices per dense item (0 = none; an item's first ``max_tags`` tags,
    in their order) and the tag table's size (distinct tags + 1)."""
    if items is None or "tags" not in items.column_names:
        raise DataError(STAGE, "items", f"{what} need(s) an items table with a 'tags' column")
    tags = pc.fill_null(items["tags"], pa.scalar([], pa.list_(pa.string()))).combine_chunks()
    lens = pc.list_value_length(tags).to_numpy(zero_copy_only=False)
    flat = np.asarray(tags.flatten().to_numpy(zero_copy_only=False), dtype=object)
    uniq, inv = np.unique(flat.astype(str), return_inverse=True) if len(flat) else (np.zeros(0, str), np.zeros(0, int))
    out = np.zeros((index.n + 1, max_tags), np.int64)
    rows = index.lookup(items["item_id"].to_numpy(), "items")
    owner = np.repeat(rows, lens)
    slot = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    keep = slot < max_tags
    out[owner[keep], slot[keep]] = inv[keep] + 1
    return out, len(uniq) + 1


def prepare(samples: Samples, index: ItemIndex, cfg: RankConfig, *,
            embeddings: tuple[np.ndarray, np.ndarray] | None = None, codes: pa.Table | None = None,
            items: pa.Table | None = None, models: list[str] | None = None) -> RankData:
    """Dense arrays for ``models`` (default ``cfg.models``); runs the GSU searches they need once.

    ``embeddings``: (item_ids ``(m,)``, vectors ``(m, d)``); ``codes``: the codes table. Each is
    required only by the models that use it (a DataError says which).
    """
    models = list(models or cfg.models)
    specs = [resolve_spec(m, cfg.model.frozen_embedding) for m in models]
    s = samples.samples
    if s.num_rows == 0:
        raise DataError(STAGE, "samples", "no samples (is the interaction log empty?)")
    seq_users = samples.sequences["user_id"].to_numpy()
    lens = np.array(pc.list_value_length(samples.sequences["items"]).to_numpy(zero_copy_only=False),
                    dtype=np.int64)
    seq_flat = np.concatenate([[0], index.lookup(
        samples.sequences["items"].combine_chunks().flatten().to_numpy(), "interactions")])
    starts = 1 + np.concatenate([[0], np.cumsum(lens)[:-1]])   # +1: seq_flat[0] is a spare 0
    user_id = s["user_id"].to_numpy()
    row = np.searchsorted(seq_users, user_id)
    if (row >= len(seq_users)).any() or (seq_users[np.minimum(row, len(seq_users) - 1)] != user_id).any():
        raise DataError(STAGE, "samples", "samples reference users without a sequence")
    split = s["split"].to_numpy(zero_copy_only=False)
    report: dict = {}

    tables = ItemTables(n_items=index.n)
    need_codes = any(sp.sids or sp.retrieval == "hard:c1" for sp in specs)
    need_emb = any(sp.gsu == "embedding" or sp.vq or sp.frozen_embedding for sp in specs)
    if need_codes:
        if codes is None:
            raise DataError(STAGE, "codes", f"models {[sp.name for sp in specs if sp.sids or sp.retrieval == 'hard:c1']} "
                                            "need Semantic-ID codes and none were given")
        c, vocab, n_missing = align_codes(index, codes, cfg.model.missing_codes)
        tables.codes, tables.code_vocab = c, vocab
        report["items.missing_codes"] = n_missing
        report["items.missing_code_share"] = n_missing / max(index.n, 1)
    emb = None
    if need_emb:
        if embeddings is None:
            raise DataError(STAGE, "embeddings", "models using the GSU over item embeddings, VQ codes or frozen "
                                                 "embeddings need embeddings and none were given")
        emb, n_missing = align_embeddings(index, embeddings[0], embeddings[1], cfg.gsu.missing_embedding)
        report["items.missing_embeddings"] = n_missing
        if any(sp.frozen_embedding for sp in specs):
            tables.frozen = emb
        if any(sp.vq for sp in specs):
            tables.neighbours = G.nearest_items(emb, cfg.model.vq_neighbours)

    if any(sp.tags for sp in specs):
        tables.tags, tables.tag_vocab = item_tags(index, items)
    data = RankData(index=index, seq_flat=seq_flat, user_start=starts[row], user_id=user_id,
                    target=index.lookup(s["item_id"].to_numpy(), "samples"),
                    label=s["label"].to_numpy().astype(np.float32), pos=s["pos"].to_numpy().astype(np.int64),
                    split=split, neg_set=s["neg_set"].to_numpy().astype(np.int16),
                    short_len=cfg.samples.short_len, long_len=cfg.samples.long_len, top_k=cfg.gsu.top_k,
                    tables=tables, report=report)
    hist = lambda rows: data.history(rows, cfg.samples.long_len)          # noqa: E731
    if any(sp.gsu == "embedding" for sp in specs):
        t0 = time.perf_counter()
        vecs = pca(emb, cfg.gsu.pca_dim)
        data.retrieved["embedding"] = G.search_samples(data.target, hist, cfg.gsu.top_k, cfg.gsu.chunk_rows,
                                                       item_vecs=vecs)
        dt = time.perf_counter() - t0
        report["gsu.embedding.seconds"] = dt
        report["gsu.embedding.retrievals_per_s"] = len(data.target) / max(dt, 1e-9)
    for key in sorted({sp.hard_key for sp in specs if sp.gsu == "hard"}):
        cat = categories(index, items, tables.codes, key)
        data.retrieved[f"hard:{key}"] = G.search_samples(data.target, hist, cfg.gsu.top_k, cfg.gsu.chunk_rows,
                                                         item_cat=cat)
    return data
