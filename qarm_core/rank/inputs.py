"""Item-side inputs of the ranking stage: embeddings and Semantic-ID codes, aligned to a dense index.

Every item the samples reference gets a dense index ``1..n`` (0 is padding); embeddings ``(n + 1, d)``
and codes ``(n + 1, 3)`` are rows of that index. Fallbacks, all documented and counted:

* an item without a code gets the reserved code 0 at every level (``model.missing_codes: reserved``;
  real codes are shifted by +1), or the run fails (``error``);
* an item without an embedding fails the run (``gsu.missing_embedding: error``), or is searched with a
  zero vector (``zero``), which scores 0 against every target.

``minilm_inputs`` makes embeddings and codes when no embedding stage has run yet: MiniLM
(all-MiniLM-L6-v2, 384-d, L2-normalised) over each item's text line (``title (year), genres: ...``),
then residual k-means + FSQ Semantic IDs from ``qarm_core.quantize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qarm_core.arrays import has_duplicates, sorted_unique
from qarm_core.errors import DataError
from qarm_core.quantize.config import QuantizerParams

STAGE = "rank"


@dataclass(frozen=True)
class ItemIndex:
    """Dense item index: ``item_ids[i - 1]`` is the item of index ``i``; 0 is padding."""

    item_ids: np.ndarray                      # (n,) int64, sorted

    @property
    def n(self) -> int:
        return len(self.item_ids)

    def lookup(self, ids: np.ndarray, dataset: str) -> np.ndarray:
        """Item ids ``(...)`` -> dense indices ``(...)`` int64 in 1..n; unknown ids are a DataError."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, ids)
        pos_c = np.minimum(pos, max(self.n - 1, 0))
        ok = (pos < self.n) & (self.item_ids[pos_c] == ids) if self.n else np.zeros(ids.shape, bool)
        if not ok.all():
            bad = sorted_unique(ids[~ok])
            raise DataError(STAGE, dataset, f"{int((~ok).sum())} reference(s) to {len(bad)} unknown item id(s), "
                                            f"e.g. {bad[:5].tolist()}")
        return pos + 1


def read_table(path: str | Path, dataset: str, columns: list[str]) -> pa.Table:
    """A Parquet file or a folder of ``*.parquet`` files, with the given columns, or a DataError."""
    p = Path(path)
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not p.exists() or not files:
        raise DataError(STAGE, dataset, f"no Parquet data at {p}")
    try:
        return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise DataError(STAGE, dataset, f"unreadable {dataset} at {p} (needs columns {columns}): {exc}") from None


def align_embeddings(index: ItemIndex, item_ids: np.ndarray, vectors: np.ndarray,
                     missing: str = "error") -> tuple[np.ndarray, int]:
    """Embedding rows for the index: ``(n + 1, d)`` float32 with row 0 zero, and the number of
    indexed items that had no embedding (zero rows with ``missing="zero"``; else a DataError)."""
    if vectors.ndim != 2 or len(vectors) != len(item_ids):
        raise DataError(STAGE, "embeddings", f"{len(item_ids)} ids for vectors of shape {vectors.shape}")
    if has_duplicates(item_ids):
        raise DataError(STAGE, "embeddings", "duplicate item ids")
    if not np.isfinite(vectors).all():
        raise DataError(STAGE, "embeddings", "embeddings hold NaN/inf")
    out = np.zeros((index.n + 1, vectors.shape[1]), np.float32)
    pos = np.searchsorted(index.item_ids, item_ids)
    pos_c = np.minimum(pos, max(index.n - 1, 0))
    known = (pos < index.n) & (index.item_ids[pos_c] == item_ids)
    out[pos[known] + 1] = vectors[known]
    have = np.zeros(index.n + 1, bool)
    have[pos[known] + 1] = True
    n_missing = int(index.n - have[1:].sum())
    if n_missing and missing == "error":
        lacking = index.item_ids[~have[1:]]
        raise DataError(STAGE, "embeddings", f"{n_missing} item(s) in the log have no embedding, e.g. "
                                             f"{lacking[:5].tolist()} (gsu.missing_embedding: zero searches them "
                                             f"with a zero vector)")
    return out, n_missing


def align_codes(index: ItemIndex, codes: pa.Table, missing: str = "reserved") -> tuple[np.ndarray, np.ndarray, int]:
    """Codes for the index: ``(n + 1, 3)`` int64 of (c1, c2, c3) shifted by +1 so that 0 means "no
    code" (row 0, padding, and items without a code under ``missing="reserved"``), the vocabulary
    size per level ``(3,)`` (reserved index included), and the number of indexed items without a code."""
    for c in ("item_id", "c1", "c2", "c3"):
        if c not in codes.column_names:
            raise DataError(STAGE, "codes", f"codes need columns item_id, c1, c2, c3; missing {c!r}")
    ids = codes["item_id"].to_numpy().astype(np.int64)
    raw = np.stack([codes[c].to_numpy().astype(np.int64) for c in ("c1", "c2", "c3")], axis=1)
    if has_duplicates(ids):
        raise DataError(STAGE, "codes", "duplicate item ids")
    if (raw < 0).any():
        raise DataError(STAGE, "codes", f"negative codes for {int((raw < 0).any(1).sum())} item(s)")
    # c3 packs the FSQ digits (up to levels ** dims values); renumber each level densely so that
    # the embedding tables are only as large as the codes in use.
    dense = np.zeros_like(raw)
    vocab = np.zeros(3, np.int64)
    for j in range(3):
        uniq, inv = np.unique(raw[:, j], return_inverse=True)
        dense[:, j] = inv + 1
        vocab[j] = len(uniq) + 1
    out = np.zeros((index.n + 1, 3), np.int64)
    pos = np.searchsorted(index.item_ids, ids)
    pos_c = np.minimum(pos, max(index.n - 1, 0))
    known = (pos < index.n) & (index.item_ids[pos_c] == ids)
    out[pos[known] + 1] = dense[known]
    n_missing = int((out[1:, 0] == 0).sum())
    if n_missing and missing == "error":
        lacking = index.item_ids[out[1:, 0] == 0]
        raise DataError(STAGE, "codes", f"{n_missing} item(s) in the log have no Semantic ID, e.g. "
                                        f"{lacking[:5].tolist()} (model.missing_codes: reserved maps them to "
                                        f"a reserved 'no code' index)")
    return out, vocab, n_missing


def pca(x: np.ndarray, dim: int | None) -> np.ndarray:
    """Rows of ``x`` ``(n, d)`` projected on their top ``dim`` principal axes ``(n, dim)`` (centred;
    all-zero rows, i.e. padding and missing items, stay zero). ``dim`` None or >= d: ``x`` unchanged."""
    if dim is None or dim >= x.shape[1]:
        return x.astype(np.float32, copy=False)
    live = np.abs(x).sum(1) > 0
    mu = x[live].mean(0)
    # Covariance (d x d) rather than an SVD of x: bounded memory for any number of items.
    xc = x[live] - mu
    cov = (xc.T.astype(np.float64) @ xc) / max(len(xc) - 1, 1)
    w, v = np.linalg.eigh(cov)
    axes = v[:, np.argsort(w)[::-1][:dim]].astype(np.float32)
    out = np.zeros((len(x), dim), np.float32)
    out[live] = (x[live] - mu) @ axes
    return out


def fallback_quantizer() -> QuantizerParams:
    """The quantizer of the fallback inputs (a coarse code space for a catalog of thousands of items):
    the one place its settings live; they are part of the fallback's cache key."""
    return QuantizerParams(levels=(32, 16), fsq_dims=2, fsq_levels=4, seed=0)


def fallback_key(items_fingerprint: str | None, embeddings_path: str | None, missing: list[str]) -> dict:
    """What the fallback inputs depend on (hashed into their cache key): the catalog or the
    embeddings at hand, the quantizer's settings, the sentence embedder and what is missing."""
    from qarm_core.lm.sentence import minilm_signature

    basis = {"embeddings": embeddings_path} if embeddings_path else {"items": items_fingerprint,
                                                                     "minilm": minilm_signature()}
    return {**basis, "quantizer": fallback_quantizer().model_dump(mode="json"), "missing": sorted(missing)}


def quantize_codes(item_ids: np.ndarray, x: np.ndarray, params: QuantizerParams | None = None
                   ) -> tuple[pa.Table, dict]:
    """Semantic IDs of embeddings ``x`` ``(n, d)`` with qarm_core.quantize (residual k-means per level,
    capped at n clusters, then FSQ; ``params`` default: ``fallback_quantizer()``): (codes table,
    quantizer metrics)."""
    from qarm_core.quantize.quantizer import quantize_embeddings

    params = params or fallback_quantizer()
    levels = tuple(min(k, len(item_ids)) for k in params.levels)
    _, codes, metrics = quantize_embeddings(np.array(x, dtype=np.float32), np.asarray(item_ids, np.int64),
                                            params.model_copy(update={"levels": levels}))
    return codes, metrics


def minilm_inputs(items: pa.Table, out_dir: str | Path, params: QuantizerParams | None = None,
                  embedder=None) -> tuple[Path, Path, dict]:
    """Embed every catalog item's text with MiniLM and quantize it (``quantize_codes``); writes
    ``out_dir/embeddings.parquet`` (item_id, vector, model_version) and ``out_dir/codes.parquet``
    (the quantizer's codes table). Returns (embeddings path, codes path, quantizer metrics)."""
    from qarm_core.lm.sentence import embed_item_texts
    from qarm_core.quantize.io import embeddings_batch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids, x, model_id = embed_item_texts(items, embedder)
    emb_path, codes_path = out / "embeddings.parquet", out / "codes.parquet"
    pq.write_table(pa.Table.from_batches([embeddings_batch(ids, x, f"minilm:{model_id}")]), emb_path)
    codes, metrics = quantize_codes(ids, x, params)
    pq.write_table(codes, codes_path)
    return emb_path, codes_path, metrics


ITEM_INPUTS = ("embeddings", "codes")


def choose_item_inputs(need: dict[str, bool], explicit: dict[str, str | None], published: dict[str, str | None],
                       snapshot_id: str | None) -> tuple[dict[str, str | None], dict[str, str], list[str]]:
    """Where each item input (embeddings, codes) comes from: an explicit path (which must exist), else
    the published snapshot. Returns (paths, sources, the needed inputs that have neither)."""
    paths: dict[str, str | None] = {n: None for n in ITEM_INPUTS}
    sources: dict[str, str] = {}
    for name in ITEM_INPUTS:
        if explicit.get(name) is not None:
            if not Path(explicit[name]).exists():
                raise DataError(STAGE, name, f"{name} path {explicit[name]} does not exist")
            paths[name], sources[name] = str(explicit[name]), "path"
        elif published.get(name) is not None:
            paths[name], sources[name] = published[name], f"snapshot:{snapshot_id}"
    return paths, sources, [n for n in ITEM_INPUTS if need[n] and paths[n] is None]


def fallback_inputs(items: pa.Table, embeddings_path: str | None, missing: list[str], work_dir: str | Path
                    ) -> dict[str, pa.Table]:
    """The missing item inputs, made here: codes alone are quantized from the embeddings at hand (so
    the two stay consistent); missing embeddings (and their codes) come from MiniLM over the item text."""
    import tempfile

    from qarm_core.quantize.io import read_embeddings

    if missing == ["codes"] and embeddings_path is not None:
        ids, x = read_embeddings(embeddings_path)
        return {"codes": quantize_codes(ids, x)[0]}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        e, c, _ = minilm_inputs(items, tmp)
        made = {"embeddings": pq.read_table(e), "codes": pq.read_table(c)}
    return {n: made[n] for n in missing}
