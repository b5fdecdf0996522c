"""Train and embed tasks (stages 3-4): fine-tune the three-segment LLM (or reuse the published
model), score the baseline embeddings (beside training, when the flow's stages may overlap), then
embed the whole catalog with the model and gate it against them."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import get_run_logger, task

from qarm_core import __version__
from qarm_core.config import PipelineConfig
from qarm_core.hashing import stable_hash
from qarm_core.plots import plot_loss_curves
from qarm_core.embed.config import RUN_NEUTRAL_TRAIN_FIELDS
from qarm_core.embed.stage import baselines_stage, embed_stage, iter_embedding_batches, train_stage
from qarm_core.schemas import SCHEMAS, embeddings_schema
from qarm_core.storage import CURRENT_AT_READ, DatasetRecord, Storage, read_dataset, write_stage_outputs
from tasks import tracking
from tasks.common import TASK_DEFAULTS, StageSpec, is_timing, link_tree, run_stage
from tasks.executor import shard_runner

MODEL_FORMAT = 1


def reuses_model(cfg: PipelineConfig, published: DatasetRecord | None) -> bool:
    """Whether this run takes the ``published`` model as it is (``embed.reuse_model``, the daily
    schedule, and a model is published) instead of training one."""
    return cfg.embed.reuse_model and published is not None


@task(name="train-embedding-model", **TASK_DEFAULTS)
def train(cfg: PipelineConfig, parent_run_id: str, judgments: DatasetRecord, qa: DatasetRecord,
          items: DatasetRecord, parent: str | None = CURRENT_AT_READ) -> dict[str, DatasetRecord]:
    """Stage ``model``: the fine-tuned model folder (safetensors + tokenizer + projection).

    With ``embed.reuse_model`` the published model is taken as it is (the daily schedule), unless
    there is none yet. A run killed mid-training resumes from its last checkpoint on the rerun.
    ``parent``: the snapshot whose model is reused or continued.
    """
    storage = Storage(cfg.home).as_of(parent)
    log = get_run_logger()
    with tracking.stage_run(cfg, parent_run_id, "train") as run:
        published = storage.published("model")
        if reuses_model(cfg, published):
            run.params({"reuse_model": True, "model": published.path})
            run.metrics({"reused": 1.0, "reused_published": 1.0})
            log.info("train: reusing the published model %s", published.path)
            return {"model": published}
        # the weekly retrain continues from the published model; its fingerprint is then an input
        start = published if cfg.embed.train.init_from == "published" and published is not None else None
        embed_cfg = cfg.embed if start is None else \
            cfg.embed.model_copy(update={"model": cfg.embed.model.model_copy(update={"model": start.path})})
        # continuing the published model: its embeddings anchor the stability term (if weighted)
        anchor = storage.published("embeddings") if start is not None and cfg.embed.train.stability_weight else None
        key = stable_hash({"judgments": judgments.fingerprint, "qa": qa.fingerprint, "items": items.fingerprint,
                           "model": cfg.embed.model.model_dump(mode="json"),
                           "start": start.fingerprint if start is not None else "base",
                           **({"reference": anchor.fingerprint} if anchor is not None else {}),
                           # the nodes of one run share its run folder (see RUN_NEUTRAL_TRAIN_FIELDS)
                           "train": cfg.embed.train.model_dump(mode="json", exclude=set(RUN_NEUTRAL_TRAIN_FIELDS)),
                           "qarm": __version__})
        run_dir = storage.run_dir("train", key)
        report: dict = {}

        def progress(p: dict) -> None:
            step = int(p.get("step", 0))
            run.metrics({k: v for k, v in p.items() if k != "step" and isinstance(v, (int, float))}, step=step)

        def write_model(folder: Path) -> None:
            reference = read_dataset(anchor, columns=["item_id", "vector"]) if anchor is not None else None
            rec = train_stage(read_dataset(items), read_dataset(judgments), read_dataset(qa), embed_cfg,
                              run_dir, progress, reference, storage.train_nodes_board)
            report.update({k: float(v) for k, v in rec.to_dict().items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
            report["notes"] = {"model_version": rec.model_version, "deepspeed": str(rec.deepspeed),
                               "zero_stage": str(rec.zero_stage), "dtype": rec.dtype,
                               "dtype_reason": rec.dtype_reason, "backend": rec.backend or "none",
                               "rows": rec.rows or "none"}
            link_tree(Path(rec.model_dir), folder)

        records, reused, report = write_stage_outputs(storage, "train", key, {}, report,
                                                      artifacts={"model": (MODEL_FORMAT, write_model)})
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints: the finished model is staged
        run.params({"model": cfg.embed.model.model_dump(mode="json"), "train": cfg.embed.train.model_dump(mode="json"),
                    "key": key, "started_from": start.path if start is not None else "base"})
        run.metrics({k: v for k, v in report.items() if isinstance(v, (int, float)) and not (reused and is_timing(k))}
                    | {"reused": float(reused)})
        run.tags({f"qarm.{k}": v for k, v in report.get("notes", {}).items()})
        if not reused and cfg.tracking.plots:
            tracking.log_plot(tracking.run_handle(cfg, parent_run_id), plot_loss_curves,
                              tracking.metric_curves(run, ["loss", "nce", "qa"]), name="train_loss.png",
                              title=f"training loss ({report.get('notes', {}).get('model_version', '')})")
        log.info("train: %s%s steps, %.0f tokens/s, loss %.3f -> %.3f",
                 "reused the model of an earlier run with the same inputs; as that run reported: " if reused else "",
                 f"{report.get('steps', 0):.0f}", report.get("tokens_per_s", 0.0),
                 report.get("loss_first", float("nan")), report.get("loss_last", float("nan")))
    return records


# What the baselines' scores depend on in cfg.embed (not training: they run beside it and are
# reused by runs that train differently): their models, how the catalog is embedded, and which
# validation pairs the recall is measured on.
BASELINES_EMBED_FIELDS = frozenset({"model", "infer", "baselines", "eval_k", "eval_max_pairs"})


def baselines_key_inputs(cfg: PipelineConfig, items: DatasetRecord, train_events: DatasetRecord,
                         valid_events: DatasetRecord) -> dict:
    """The cache key inputs of the baselines stage."""
    return {"items": items.fingerprint, "train_events": train_events.fingerprint,
            "valid_events": valid_events.fingerprint, "positive_rule": cfg.events.model_dump(mode="json"),
            "embed": cfg.embed.model_dump(mode="json", include=set(BASELINES_EMBED_FIELDS))}


@task(name="embed-baselines", **TASK_DEFAULTS)
def baselines(cfg: PipelineConfig, parent_run_id: str, items: DatasetRecord, train_events: DatasetRecord,
              valid_events: DatasetRecord, parent: str | None = CURRENT_AT_READ) -> dict[str, DatasetRecord]:
    """Stage ``baseline_scores`` (model, metric, value): the embed gate's baselines
    (``embed.baselines``: the base model, MiniLM) embedded and scored on the validation period's
    co-occurrence. It needs no trained model, so the flow runs it beside training when its stages
    may overlap (``executor.overlap_stages``). Returns {} when the run reuses the published model
    (the baselines were compared when it was trained) or no baseline is configured."""
    storage = Storage(cfg.home).as_of(parent)
    if reuses_model(cfg, storage.published("model")) or not cfg.embed.baselines:
        get_run_logger().info("baselines: not needed (%s)", "the published model is reused"
                              if cfg.embed.baselines else "embed.baselines is empty")
        return {}
    key_inputs = baselines_key_inputs(cfg, items, train_events, valid_events)
    run_dir = storage.run_dir("baselines", stable_hash(key_inputs))

    def produce():
        with shard_runner(cfg) as shards:
            table, report = baselines_stage(read_dataset(items), cfg.embed, run_dir,
                                            read_dataset(train_events, columns=["item_id"]),
                                            read_dataset(valid_events), cfg.events.positive_min_rating, shards)
        report["notes"]["executor"] = cfg.executor.kind
        return {"baseline_scores": table}, report

    k = cfg.embed.eval_k
    records, _ = run_stage(cfg, parent_run_id, StageSpec(
        name="baselines", outputs={"baseline_scores": SCHEMAS["baseline_scores"]}, produce=produce,
        key_inputs=key_inputs, params={"embed.baselines": ",".join(cfg.embed.baselines)},
        summary=lambda recs, rep: "baselines: validation recall@{} {}".format(k, ", ".join(
            f"{m}={rep[f'valid.{m}.recall_at_{k}']:.3f}" for m in cfg.embed.baselines
            if f"valid.{m}.recall_at_{k}" in rep) or rep.get("notes", {}).get("eval", "n/a"))))
    shutil.rmtree(run_dir, ignore_errors=True)   # the baselines' embedding parts: their scores are staged
    return records


def _embed_summary(k: int):
    def summary(records: dict[str, DatasetRecord], report: dict) -> str:
        recall = ", ".join(f"{m}={report[f'valid.{m}.recall_at_{k}']:.3f}"
                           for m in ("finetuned", "published", "base", "minilm")
                           if f"valid.{m}.recall_at_{k}" in report) or report.get("notes", {}).get("eval", "n/a")
        return (f"embed: {records['embeddings'].rows:,} items ({report.get('encoded', 0):,.0f} encoded, "
                f"{report.get('carried_over', 0):,.0f} carried over); validation recall@{k} {recall}; "
                f"{report.get('notes', {}).get('embed.gate', '')}")
    return summary


@task(name="embed-catalog", **TASK_DEFAULTS)
def embed(cfg: PipelineConfig, parent_run_id: str, model: DatasetRecord, items: DatasetRecord,
          train_events: DatasetRecord, valid_events: DatasetRecord,
          baseline_scores: DatasetRecord | None = None,
          parent: str | None = CURRENT_AT_READ) -> dict[str, DatasetRecord]:
    """Stage ``embeddings`` (item_id, vector, model_version), one row per catalog item.

    The new model, the published one (when it differs) and the configured baselines are evaluated
    on the validation period's co-occurrence (recall@10/50, MRR to MLflow). The gate on the train
    -> embed edge (``qarm_core.embed.stage.choose_model``) publishes the new model only if it beats
    the published one; otherwise the published model and its embeddings are kept, the reason is
    logged, and the flow goes on. ``baseline_scores``: the ``baselines`` task's output (None: no
    baseline is compared); ``parent``: the snapshot whose model and embeddings are the rival and
    the cache. Returns ``embeddings`` and the ``model`` that made them.
    """
    storage = Storage(cfg.home).as_of(parent)
    schema = embeddings_schema(cfg.embed.model.dim)
    previous, published_model = storage.published("embeddings"), storage.published("model")
    model_is_published = published_model is not None and published_model.fingerprint == model.fingerprint
    rival = published_model if published_model is not None and not model_is_published else None
    # The published embeddings are a cache (an unchanged item keeps its vector), not an input:
    # recomputing them gives the same vectors, so they are not part of the key. The published
    # model is: the gate compares against it.
    spec_inputs = {"model": model.fingerprint, "items": items.fingerprint, "train_events": train_events.fingerprint,
                   "valid_events": valid_events.fingerprint, "rival": rival.fingerprint if rival else None,
                   "positive_rule": cfg.events.model_dump(mode="json"), "embed": cfg.embed.model_dump(mode="json"),
                   "baselines": baseline_scores.fingerprint if baseline_scores is not None else None}
    run_dir = storage.run_dir("embed", stable_hash(spec_inputs))

    def produce():
        with shard_runner(cfg) as shards:
            rec, report = embed_stage(read_dataset(items), model.path, cfg.embed, run_dir,
                                      previous=previous.path if previous is not None else None,
                                      model_is_published=model_is_published,
                                      train_events=read_dataset(train_events, columns=["item_id"]),
                                      valid_events=read_dataset(valid_events),
                                      min_rating=cfg.events.positive_min_rating,
                                      published_model=rival.path if rival else None, shards=shards,
                                      baselines=read_dataset(baseline_scores) if baseline_scores else None)
        report.setdefault("notes", {})["executor"] = cfg.executor.kind
        return {"embeddings": iter_embedding_batches(rec.path, schema.schema)}, report

    records, report = run_stage(cfg, parent_run_id, StageSpec(
        name="embed", outputs={"embeddings": schema}, produce=produce, key_inputs=spec_inputs,
        params={"embed": cfg.embed.model_dump(mode="json"), "model": model.path,
                "rival": rival.path if rival else "none"},
        summary=_embed_summary(cfg.embed.eval_k)))   # the gate's verdict: the summary line and tag qarm.embed.gate
    shutil.rmtree(run_dir, ignore_errors=True)   # the embedding parts: the dataset is staged
    chosen = rival if report.get("notes", {}).get("model_choice") == "published" else model
    return {**records, "model": chosen}
