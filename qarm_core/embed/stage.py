"""Stages 3-4 as the flow calls them: ``train_stage`` (fine-tune, resumable), ``baselines_stage``
(embed the catalog with the baseline models and score them on the validation period's
co-occurrence; it needs no trained model, so the flow may run it beside training) and
``embed_stage`` (embed the catalog with the fine-tuned model, score it the same way, and keep the
published model unless the new one beats it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow as pa

from qarm_core.devices import thread_note
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
                run_dir: str | Path, progress: ProgressFn | None = None,
                reference: pa.Table | None = None, board: str | Path | None = None) -> TrainRecord:
    """Fine-tune on the kept judged pairs (minus the held-out share) and the QA pairs into
    ``run_dir/model``; a run killed mid-way resumes from ``run_dir/checkpoints``. ``reference``: the
    published embeddings when continuing the published model (``train.stability_weight``).
    ``board``: where a multi-node run's job is posted for the other nodes (``qarm train-node``)."""
    return train_embedding_model(items, judgments, qa, run_dir, cfg.model, cfg.train, progress, reference, board)


EVAL_KS = (10, 50)


def validation_pairs(items: pa.Table, train_events: pa.Table | None, valid_events: pa.Table | None,
                     min_rating: float | None = POSITIVE_MIN_RATING) -> tuple[pa.Table | None, str]:
    """The pairs every embedding is scored on: the validation period's co-occurring positives
    (``cooccurrence_pairs``) among items of the training period that are in ``items``. Returns
    ``(pairs, "")``, or ``(None, why)`` when there is nothing to score on. The stages score on
    ``sampled_validation_pairs`` of them."""
    from qarm_core.embed.evaluate import cooccurrence_pairs

    if train_events is None or valid_events is None:
        return None, "skipped: no validation events given"
    pairs = cooccurrence_pairs(valid_events, train_events["item_id"].to_numpy(), min_rating)
    pairs = pairs.filter(pa.compute.is_in(pairs["src_item"], items["item_id"])) if pairs.num_rows else pairs
    pairs = pairs.filter(pa.compute.is_in(pairs["dst_item"], items["item_id"])) if pairs.num_rows else pairs
    if pairs.num_rows == 0:
        return None, "skipped: no co-occurring positives in the validation period among training items"
    return pairs, ""


def sampled_validation_pairs(pairs: pa.Table, max_pairs: int | None) -> tuple[pa.Table, dict[str, float]]:
    """At most ``max_pairs`` of ``validation_pairs``' pairs (``embed.evaluate.sample_pairs``: the same
    pairs whatever their order, so the baselines' stage and the embed stage score on one sample),
    and the report's ``eval.pairs`` (scored on) and ``eval.pairs_total`` (before the sample)."""
    from qarm_core.embed.evaluate import sample_pairs

    sample, total = sample_pairs(pairs, max_pairs)
    return sample, {"eval.pairs": float(sample.num_rows), "eval.pairs_total": float(total)}


def score_embeddings(paths: dict[str, str], pairs: pa.Table, eval_k: int) -> dict[str, float]:
    """``valid.<model>.<metric>`` (recall_at_10/50 and at ``eval_k``, mrr) of each model's
    embeddings folder in ``paths`` on ``pairs``."""
    from qarm_core.embed.evaluate import recall_report
    from qarm_core.quantize.io import read_embeddings

    ks = tuple(sorted(set(EVAL_KS) | {eval_k}))
    report: dict[str, float] = {}
    for name, path in paths.items():
        ids, x = read_embeddings(path)
        report |= {f"valid.{name}.{key}": v for key, v in recall_report(ids, x, pairs, ks).items() if key != "queries"}
    return report


def embed_baselines(items: pa.Table, cfg: "EmbedStageConfig", run_dir: str | Path,
                    shards: "ShardRunner | None" = None) -> dict[str, str]:
    """Embed the catalog with each of ``cfg.baselines`` into ``run_dir/<baseline>`` (resumable
    parts); returns their folders by name. "base" is the untrained three-segment model, "minilm"
    the sentence embedder over the same text."""
    run_dir = Path(run_dir)
    paths: dict[str, str] = {}
    for b in cfg.baselines:
        if b == "base":
            paths[b] = embed_catalog(items, run_dir / "base", cfg.model, cfg.infer, shards=shards).path
        else:
            paths[b] = embed_catalog_minilm(items, run_dir / "minilm", cfg.infer, shards=shards).path
    return paths


def baselines_stage(items: pa.Table, cfg: "EmbedStageConfig", run_dir: str | Path,
                    train_events: pa.Table | None, valid_events: pa.Table | None,
                    min_rating: float | None = POSITIVE_MIN_RATING,
                    shards: "ShardRunner | None" = None) -> tuple[pa.Table, dict]:
    """The baselines' side of the embed gate, which needs no trained model: embed the catalog with
    ``cfg.baselines`` (``embed_baselines``) and score them on ``validation_pairs``. Returns the
    ``baseline_scores`` table (model, metric, value: one row per ``valid.<model>.<metric>``; empty
    when there is nothing to score on) and a report with the same figures and ``notes``.
    ``embed_stage(..., baselines=table)`` takes the table instead of embedding the baselines itself."""
    pairs, why = validation_pairs(items, train_events, valid_events, min_rating)
    report: dict = {"notes": {}}
    if pairs is None:
        report["notes"]["eval"] = why
        scores: dict[str, float] = {}
    else:
        pairs, counts = sampled_validation_pairs(pairs, cfg.eval_max_pairs)
        scores = score_embeddings(embed_baselines(items, cfg, run_dir, shards), pairs, cfg.eval_k)
        report |= scores | counts
    report["notes"]["baselines"] = ",".join(cfg.baselines) or "none"
    rows = [key.split(".", 2)[1:] + [value] for key, value in sorted(scores.items())]
    table = pa.table({"model": pa.array([r[0] for r in rows], pa.string()),
                      "metric": pa.array([r[1] for r in rows], pa.string()),
                      "value": pa.array([r[2] for r in rows], pa.float64())})
    return table, report


def read_baseline_scores(table: pa.Table) -> dict[str, float]:
    """``baselines_stage``'s table back as ``valid.<model>.<metric>`` -> value."""
    return {f"valid.{m}.{k}": float(v) for m, k, v in
            zip(table["model"].to_pylist(), table["metric"].to_pylist(), table["value"].to_pylist())}


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
                shards: "ShardRunner | None" = None, baselines: pa.Table | None = None) -> tuple[EmbedRecord, dict]:
    """Embed every item with the model in ``model_dir`` into ``run_dir/finetuned`` (resumable
    parts), evaluate it on the validation period's co-occurrence (``validation_pairs``:
    recall@10/50, MRR) beside the baselines' scores, and choose what to publish (``choose_model``).
    The published model (``model_is_published``) is scored only with ``cfg.eval_reused_model``.

    ``baselines``: the table of ``baselines_stage`` (the flow runs it beside training; it is skipped
    when the model is the published one, compared when it was trained). Without it a new model is
    compared with the published one only, and on a first run not gated.
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
    run_dir = Path(run_dir)
    tuned = cfg.model.model_copy(update={"model": str(model_dir)})
    rec = embed_catalog(items, run_dir / "finetuned", tuned, cfg.infer, progress, previous=previous, shards=shards)
    # items_per_s: per second of one process's model time (with shards: per worker)
    report: dict = {"items_per_s": rec.items_per_s, "seconds": rec.seconds, "dim": float(rec.dim),
                    "workers": float(rec.workers),
                    "encoded": float(rec.encoded), "carried_over": float(rec.carried_over)}
    notes = {"model_version": rec.model_version, "dtype": rec.dtype, "dtype_reason": rec.dtype_reason,
             "threads": thread_note()}
    records = {"finetuned": rec}
    paths = {"finetuned": rec.path}
    if published_model is not None:
        old = cfg.model.model_copy(update={"model": str(published_model)})
        records["published"] = embed_catalog(items, run_dir / "published", old, cfg.infer, progress,
                                             previous=previous, shards=shards)
        paths["published"] = records["published"].path
    if model_is_published and not cfg.eval_reused_model:
        pairs, why = None, ("not scored: the model is the published one, scored when it was trained "
                            "(embed.eval_reused_model: true scores it on every run; qarm evaluate scores it)")
    else:
        pairs, why = validation_pairs(items, train_events, valid_events, min_rating)
    if baselines is None and model_is_published and cfg.baselines:
        notes["baselines"] = "not run: the model is the published one (they were compared when it was trained)"
    if pairs is None:
        notes["eval"] = why
    else:
        pairs, counts = sampled_validation_pairs(pairs, cfg.eval_max_pairs)
        report |= score_embeddings(paths, pairs, cfg.eval_k) | counts
        if baselines is not None:
            report |= read_baseline_scores(baselines)
    recall = {key.split(".")[1]: v for key, v in report.items()
              if key.startswith("valid.") and key.endswith(f".recall_at_{cfg.eval_k}")}
    choice, passed, reason = choose_model(recall, model_is_published=model_is_published,
                                          has_published=published_model is not None, k=cfg.eval_k)
    report["gate.passed"] = float(passed)
    notes |= {"model_choice": choice, "embed.gate": reason}
    if choice == "published":
        notes["model_version"] = records["published"].model_version
    report["notes"] = notes
    return records[choice], report
