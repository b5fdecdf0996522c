"""Stages 3-4 as the flow calls them: ``train_stage`` (fine-tune, resumable) and ``embed_stage``
(embed the catalog with the fine-tuned model, and the baselines for comparison, evaluate all of them
on the validation period's co-occurrence, and keep the published model unless the new one beats it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow as pa

from qarm_core.embed.embed import EmbedRecord, embed_catalog, embed_catalog_minilm
from qarm_core.embed.train import TrainRecord, train_embedding_model
from qarm_core.events import POSITIVE_MIN_RATING

if TYPE_CHECKING:
    from qarm_core.embed.config import EmbedStageConfig
    from qarm_core.executor import ShardRunner

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


EVAL_KS = (10, 50)


def choose_model(recall: dict[str, float], model_is_published: bool, has_published: bool, k: int = 10
                 ) -> tuple[str, bool, str]:
    """The gate on the train -> embed edge: which model's embeddings to publish.

    ``recall``: validation recall@k per evaluated model (``finetuned``, ``published``, ``base``,
    ``minilm``). Returns ``(choice, passed, reason)``: ``choice`` is ``"finetuned"`` or
    ``"published"``. A new model must beat the published one (first run: the base model) on
    validation recall@k; otherwise the published model is kept. On a first run there is nothing to
    keep: the new model is published with ``passed = False`` and the reason says so.
    """
    if model_is_published:
        return "finetuned", True, "the model is the published one (reused): nothing to compare"
    new = recall.get("finetuned")
    ref_name = "published" if has_published else "base"
    ref = recall.get(ref_name)
    if new is None or ref is None:
        return "finetuned", True, (f"not gated: no validation recall for the "
                                   f"{'new model' if new is None else ref_name}")
    if new > ref:
        return "finetuned", True, f"new model's validation recall@{k} {new:.4f} > {ref_name} {ref:.4f}"
    if has_published:
        return "published", False, (f"kept the published model: the new one's validation recall@{k} {new:.4f} "
                                    f"<= the published {ref:.4f}")
    return "finetuned", False, (f"published the new model although its validation recall@{k} {new:.4f} <= base "
                                f"{ref:.4f}: a first run has no earlier model to keep")


def embed_stage(items: pa.Table, model_dir: str | Path, cfg: "EmbedStageConfig", run_dir: str | Path,
                progress: ProgressFn | None = None, previous: str | Path | None = None,
                model_is_published: bool = False, train_events: pa.Table | None = None,
                valid_events: pa.Table | None = None, min_rating: float | None = POSITIVE_MIN_RATING,
                published_model: str | Path | None = None,
                shards: "ShardRunner | None" = None) -> tuple[EmbedRecord, dict]:
    """Embed every item with the model in ``model_dir`` into ``run_dir/finetuned`` (resumable
    parts), and, unless the model is the published one (``model_is_published``: the baselines were
    compared when it was trained), with each of ``cfg.baselines`` into ``run_dir/<baseline>``;
    evaluate each on the validation period's co-occurrence (``cooccurrence_pairs`` of
    ``valid_events`` among the items of ``train_events``: recall@10/50, MRR), and choose what to
    publish (``choose_model``).

    ``previous``: the published embeddings folder. An item embedded there by the same model
    version from the same text keeps its vector, so a daily run with the published model encodes
    only new and changed items. ``published_model``: the published model folder when it differs
    from ``model_dir``; the catalog is then embedded with it too (carried over from ``previous``
    except new items), so that the gate compares both on the same pairs, and its embeddings are
    the ones returned if it wins. ``shards``: where the catalog's parts are embedded
    (``qarm_core.executor``; None: here).

    Returns the chosen embeddings' ``EmbedRecord`` and a report: ``items_per_s``, ``seconds``,
    ``encoded``, ``carried_over``, per model ``valid.<model>.recall_at_<k>`` and ``valid.<model>.mrr``,
    ``gate.passed``, and ``notes`` (``model_choice``, ``embed.gate``, model version, dtype).
    """
    from qarm_core.embed.evaluate import cooccurrence_pairs, recall_report
    from qarm_core.quantize.io import read_embeddings

    run_dir = Path(run_dir)
    tuned = cfg.model.model_copy(update={"model": str(model_dir)})
    rec = embed_catalog(items, run_dir / "finetuned", tuned, cfg.infer, progress, previous=previous, shards=shards)
    # items_per_s: per second of one process's model time (with shards: per worker)
    report: dict = {"items_per_s": rec.items_per_s, "seconds": rec.seconds, "dim": float(rec.dim),
                    "workers": float(rec.workers),
                    "encoded": float(rec.encoded), "carried_over": float(rec.carried_over)}
    notes = {"model_version": rec.model_version, "dtype": rec.dtype, "dtype_reason": rec.dtype_reason}
    records = {"finetuned": rec}
    paths = {"finetuned": rec.path}
    if published_model is not None:
        old = cfg.model.model_copy(update={"model": str(published_model)})
        records["published"] = embed_catalog(items, run_dir / "published", old, cfg.infer, progress,
                                             previous=previous, shards=shards)
        paths["published"] = records["published"].path
    for b in cfg.baselines if not model_is_published else ():
        if b == "base":
            paths[b] = embed_catalog(items, run_dir / "base", cfg.model, cfg.infer, shards=shards).path
        else:
            paths[b] = embed_catalog_minilm(items, run_dir / "minilm", cfg.infer).path
    if cfg.baselines and model_is_published:
        notes["baselines"] = "not run: the model is the published one (they were compared when it was trained)"
    pairs = None
    if train_events is not None and valid_events is not None:
        pairs = cooccurrence_pairs(valid_events, train_events["item_id"].to_numpy(), min_rating)
        pairs = pairs.filter(pa.compute.is_in(pairs["src_item"], items["item_id"])) if pairs.num_rows else pairs
        pairs = pairs.filter(pa.compute.is_in(pairs["dst_item"], items["item_id"])) if pairs.num_rows else pairs
    recall: dict[str, float] = {}
    if pairs is None or pairs.num_rows == 0:
        notes["eval"] = ("skipped: no validation events given" if pairs is None else
                         "skipped: no co-occurring positives in the validation period among training items")
    else:
        ks = tuple(sorted(set(EVAL_KS) | {cfg.eval_k}))
        for name, path in paths.items():
            ids, x = read_embeddings(path)
            m = recall_report(ids, x, pairs, ks)
            report |= {f"valid.{name}.{key}": v for key, v in m.items() if key != "queries"}
            recall[name] = m[f"recall_at_{cfg.eval_k}"]
        report["eval.pairs"] = float(pairs.num_rows)
    choice, passed, reason = choose_model(recall, model_is_published=model_is_published,
                                          has_published=published_model is not None, k=cfg.eval_k)
    report["gate.passed"] = float(passed)
    notes |= {"model_choice": choice, "embed.gate": reason}
    if choice == "published":
        notes["model_version"] = records["published"].model_version
    report["notes"] = notes
    return records[choice], report
