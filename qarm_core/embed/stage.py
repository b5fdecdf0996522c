"""Stages 3-4 as the flow calls them: ``train_stage`` (fine-tune, resumable) and ``embed_stage``
(embed the catalog with the fine-tuned model, and the baselines for comparison, then evaluate all
of them on the held-out judged pairs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow as pa

from qarm_core.embed.data import split_pairs
from qarm_core.embed.embed import EmbedRecord, embed_catalog, embed_catalog_minilm
from qarm_core.embed.evaluate import evaluate_embeddings
from qarm_core.embed.train import TrainRecord, train_embedding_model

if TYPE_CHECKING:
    from qarm_core.embed.config import EmbedStageConfig

ProgressFn = Callable[[dict], None]


def iter_embedding_batches(path: str | Path, schema: pa.Schema, batch_rows: int = 262_144):
    """The record batches of the embedding parts in ``path`` (sorted by name), cast to ``schema``;
    streamed, so a 10M-item catalog is never in memory twice."""
    import pyarrow.parquet as pq

    for f in sorted(Path(path).glob("*.parquet")):
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
            yield b.cast(schema)


def train_stage(items: pa.Table, judgments: pa.Table, qa: pa.Table | None, cfg: "EmbedStageConfig",
                run_dir: str | Path, progress: ProgressFn | None = None) -> TrainRecord:
    """Fine-tune on the kept judged pairs (minus the held-out share) and the QA pairs into
    ``run_dir/model``; a run killed mid-way resumes from ``run_dir/checkpoints``."""
    return train_embedding_model(items, judgments, qa, run_dir, cfg.model, cfg.train, progress)


def embed_stage(items: pa.Table, judgments: pa.Table, model_dir: str | Path, cfg: "EmbedStageConfig",
                run_dir: str | Path, progress: ProgressFn | None = None, previous: str | Path | None = None,
                with_baselines: bool = True) -> tuple[EmbedRecord, dict]:
    """Embed every item with the model in ``model_dir`` into ``run_dir/finetuned`` (resumable
    parts), and with each of ``cfg.baselines`` into ``run_dir/<baseline>`` (``with_baselines``);
    evaluate each on the held-out judged pairs (``cfg.train.holdout_fraction`` of them, the split
    training left out).

    ``previous``: the published embeddings folder. An item embedded there by the same model
    version from the same text keeps its vector, so a daily run with the published model encodes
    only new and changed items. The baselines only matter when the model is new (a daily run that
    reuses the published model passes ``with_baselines=False``).

    Returns the fine-tuned model's ``EmbedRecord`` and a report: ``items_per_s``, ``seconds``,
    ``encoded``, ``carried_over``, and per model (``finetuned``, ``base``, ``minilm``)
    ``<model>.recall_at_<k>`` and ``<model>.mrr``, plus ``notes`` (text).
    """
    from qarm_core.embed.embed import PreviousEmbeddings

    run_dir = Path(run_dir)
    tuned = cfg.model.model_copy(update={"model": str(model_dir)})
    prev = PreviousEmbeddings(previous) if previous is not None else None
    rec = embed_catalog(items, run_dir / "finetuned", tuned, cfg.infer, progress, previous=prev)
    report: dict = {"items_per_s": rec.items_per_s, "seconds": rec.seconds, "dim": float(rec.dim),
                    "encoded": float(rec.encoded), "carried_over": float(rec.carried_over)}
    notes = {"model_version": rec.model_version, "dtype": rec.dtype, "dtype_reason": rec.dtype_reason}
    paths = {"finetuned": rec.path}
    for b in cfg.baselines if with_baselines else ():
        if b == "base":
            paths[b] = embed_catalog(items, run_dir / "base", cfg.model, cfg.infer).path
        else:
            paths[b] = embed_catalog_minilm(items, run_dir / "minilm", cfg.infer).path
    if cfg.baselines and not with_baselines:
        notes["baselines"] = "not run: the model is the published one (they were compared when it was trained)"
    held = split_pairs(judgments, cfg.train.holdout_fraction, cfg.train.seed)[1] \
        if cfg.train.holdout_fraction > 0 else judgments.slice(0, 0)
    if "keep" in held.column_names:
        held = held.filter(pa.compute.fill_null(held["keep"], False))
    if held.num_rows == 0:
        notes["eval"] = "skipped: no held-out kept pairs (embed.train.holdout_fraction is 0 or too small)"
    else:
        for name, path in paths.items():
            m = evaluate_embeddings(path, held, k=cfg.eval_k)
            report[f"{name}.recall_at_{m.k}"] = m.recall_at_k
            report[f"{name}.mrr"] = m.mrr
        report["eval.queries"] = float(m.queries)
    report["notes"] = notes
    return rec, report
