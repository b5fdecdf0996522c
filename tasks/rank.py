"""Rank tasks: resolve inputs, build samples, gate them, prepare arrays, train each model, compare.

One MLflow run per model (nested under the flow's run), each with AUC / GAUC / logloss (mean and
std over seeds), per-epoch curves as step metrics and a PNG, and the model's params, so MLflow's
compare view shows the models side by side.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from qarm_core.config import PipelineConfig
from qarm_core.errors import DataError
from qarm_core.evaluation import plot_report
from qarm_core.rank.compare import (ComparisonScores, add_differences, comparison_score_arrays, load_comparison_scores,
                                    other_samples, plot_curves, pool_comparisons, pooled_reference,
                                    read_comparison_scores, summarize, tune_and_test)
from qarm_core.rank.data import RankData, build_index
from qarm_core.rank.inputs import (ITEM_INPUTS, ItemIndex, align_codes, choose_item_inputs, fallback_inputs,
                                   fallback_key)
from qarm_core.rank.models import resolve_spec
from qarm_core.rank.pipeline import ItemInputs, load_item_inputs, needs, prepare_data
from qarm_core.rank.samples import Samples, build_samples, check_samples
from qarm_core.split import cutoffs_from_periods
from qarm_core.schemas import CODES, RANK_SAMPLES, RANK_SEQUENCES, embeddings_schema
from qarm_core.storage import DatasetRecord, Storage, read_dataset
from tasks import tracking
from tasks.common import TASK_DEFAULTS, StageSpec, run_stage

STAGE = "rank"


def _read(record: DatasetRecord) -> pa.Table:
    return pa.concat_tables(pq.read_table(Path(record.path) / f) for f in record.files)


@task(name="rank-inputs", **TASK_DEFAULTS)
def rank_inputs(cfg: PipelineConfig, parent_run_id: str, embeddings_path: str | None = None,
                codes_path: str | None = None) -> dict:
    """The log and catalog of the published snapshot, and item embeddings/codes from explicit paths,
    else the published snapshot, else (``rank.inputs_fallback: minilm``) MiniLM + the quantizer
    computed here and staged under ``work/rank-inputs``. Missing inputs are a DataError that says
    which and how to provide them."""
    storage = Storage(cfg.home).ensure()
    inter, items = storage.published("interactions"), storage.published("items")
    if inter is None or items is None:
        raise DataError(STAGE, "interactions", f"no published snapshot with interactions and items under "
                                               f"{cfg.home}: run the codebook-refresh flow (qarm refresh) first")
    periods = storage.published("periods")
    if periods is None:
        raise DataError(STAGE, "periods", f"the published snapshot under {cfg.home} has no time split (an inputs "
                                          "snapshot of `qarm ingest`, or from an older qarm): run qarm refresh "
                                          "(--set ingest.source=published for the ingested data)")
    need = dict(zip(ITEM_INPUTS, needs(list(cfg.rank.models), cfg.rank.model.frozen_embedding)))
    published = {n: (rec.path if (rec := storage.published(n)) is not None else None) for n in ITEM_INPUTS}
    paths, sources, missing = choose_item_inputs(need, {"embeddings": embeddings_path, "codes": codes_path},
                                                 published, storage.current().snapshot_id)
    out = {"interactions": inter, "items": items, "periods": periods, **paths, "source": sources,
           # the pipeline's one split: the ranking trains, chooses and reports on the same periods
           "cutoffs": cutoffs_from_periods(read_dataset(periods))}
    if missing and cfg.rank.inputs_fallback == "minilm":
        from_existing = missing == ["codes"] and paths["embeddings"] is not None
        basis = fallback_key(items.fingerprint, paths["embeddings"] if from_existing else None, missing)
        schemas = {"codes": CODES}
        if "embeddings" in missing:
            schemas["embeddings"] = embeddings_schema(basis["minilm"]["dim"])
        records, _ = run_stage(cfg, parent_run_id, StageSpec(
            name="rank-inputs", outputs={n: schemas[n] for n in missing}, key_inputs=basis,
            produce=lambda: ({n: t.cast(schemas[n].schema) for n, t in fallback_inputs(
                read_dataset(items), paths["embeddings"] if from_existing else None, missing,
                storage.work_dir).items()}, {}),
            params={"missing": missing}, summary=lambda recs, rep: f"rank inputs made: {sorted(recs)}"))
        for n in missing:
            out[n] = records[n].path
            out["source"][n] = "fallback:quantized" if from_existing else "fallback:minilm"
    elif missing:
        raise DataError(STAGE, missing[0], f"models {list(cfg.rank.models)} need {' and '.join(missing)}, and "
                                           f"neither an explicit path nor the published snapshot has them: pass "
                                           f"--embeddings/--codes, publish them (codebook refresh), or set "
                                           f"rank.inputs_fallback: minilm")
    # the dense item index of the catalog, built once here for samples, gate and prepare
    out["index"] = build_index(None, read_dataset(items))
    # the refresh that published every item input used: its MLflow run gets the ranking's headline
    from_snapshot = all(v.startswith("snapshot:") for v in out["source"].values())
    out["refresh_run_id"] = storage.current().manifest.get("meta", {}).get("mlflow_run_id") if from_snapshot else None
    get_run_logger().info("rank inputs: %s", out["source"])
    return out


@task(name="rank-samples", **TASK_DEFAULTS)
def rank_samples(cfg: PipelineConfig, parent_run_id: str, inputs: dict) -> dict:
    """Build (or reuse) the time-ordered samples; staged under ``work/rank-samples/<key>``."""
    storage = Storage(cfg.home).ensure()
    inter, items = inputs["interactions"], inputs["items"]

    def produce():
        s = build_samples(read_dataset(inter), inputs["index"], cfg.rank.samples, cfg.duckdb, storage.duckdb_temp_dir,
                          inputs["cutoffs"], negative_sets=len(cfg.rank.train.seeds),
                          min_rating=cfg.events.positive_min_rating)
        return {"rank_samples": s.samples, "rank_sequences": s.sequences}, dict(s.report)

    records, report = run_stage(cfg, parent_run_id, StageSpec(
        name="rank-samples", outputs={"rank_samples": RANK_SAMPLES, "rank_sequences": RANK_SEQUENCES},
        produce=produce, key_inputs={"interactions": inter.fingerprint, "items": items.fingerprint,
                                     "periods": inputs["periods"].fingerprint,
                                     "negative_sets": len(cfg.rank.train.seeds),
                                     "positive_rule": cfg.events.model_dump(mode="json"),
                                     "samples": cfg.rank.samples.model_dump(mode="json")},
        params={"samples": cfg.rank.samples.model_dump(mode="json"), "positive_rule": cfg.events.model_dump(mode="json")},
        summary=lambda recs, rep: f"rank samples: {rep}"))
    return {"samples": records["rank_samples"], "sequences": records["rank_sequences"], "report": report}


def load_samples(records: dict) -> Samples:
    return Samples(_read(records["samples"]), _read(records["sequences"]), dict(records["report"]))


@task(name="rank-gate", **TASK_DEFAULTS)
def rank_gate(cfg: PipelineConfig, parent_run_id: str, samples: dict, inputs: dict):
    """Gate the samples (both labels per split, split by time, test users for GAUC, items without
    codes); raises GateError when a check fails. Results go to MLflow either way."""
    s = load_samples(samples)
    share = None
    if inputs.get("codes"):
        from qarm_core.rank.inputs import read_table

        index: ItemIndex = inputs["index"]
        _, _, n_missing = align_codes(index, read_table(inputs["codes"], "codes", ["item_id", "c1", "c2", "c3"]))
        share = n_missing / max(index.n, 1)
    g = cfg.rank.gate
    with tracking.stage_run(cfg, parent_run_id, "gate-rank-rank_samples") as run:
        result = check_samples(s, inputs["cutoffs"], g.min_train_samples, g.min_test_users, share, g.max_missing_code_share)
        run.gate(result)
        get_run_logger().info("gate rank/rank_samples: %s", "passed" if result.success else "FAILED")
        result.raise_if_failed()
    return result


@task(name="rank-prepare", **TASK_DEFAULTS)
def rank_prepare(cfg: PipelineConfig, parent_run_id: str, samples: dict, inputs: dict) -> RankData:
    """Dense arrays and the frozen-embedding GSU results, shared by every model and seed."""
    item_inputs: ItemInputs = load_item_inputs(inputs.get("embeddings"), inputs.get("codes"),
                                               source=str(inputs.get("source")))
    items = read_dataset(inputs["items"])
    data = prepare_data(load_samples(samples), inputs["index"], item_inputs, items, cfg.rank)
    get_run_logger().info("rank prepare: %s", data.report)
    return data


@task(name="rank-train-model", task_run_name="rank-train-{model}", **TASK_DEFAULTS)
def rank_train_model(cfg: PipelineConfig, parent_run_id: str, data: RankData, model: str, inputs: dict) -> dict:
    """Tune ``model``'s learning rate on validation over every seed, then score the chosen runs on
    test (``qarm_core.rank.compare.tune_and_test``); one MLflow run ``rank-<model>`` with the
    validation AUC per learning rate, test mean/std metrics, the chosen runs' curves (step = epoch)
    and a PNG of them. Returns the table row, the curves and the result (for the paired bootstrap)."""
    log = get_run_logger()
    with tracking.stage_run(cfg, parent_run_id, f"rank-{model}") as run:
        run.params({
            "model": model, "spec": asdict(resolve_spec(model, cfg.rank.model.frozen_embedding)),
            "rank": cfg.rank.model_dump(mode="json", exclude={"models"}),
            "inputs": {k: str(v) for k, v in inputs.get("source", {}).items()},
            "data": dict(data.report), "train_samples": len(data.train_rows),
            "valid_samples": len(data.valid_rows), "test_samples": len(data.test_rows)})
        run.tags({"qarm.rank_model": model})

        def on_epoch(lr: float, seed: int, p: dict) -> None:
            run.metrics({f"lr{lr:g}.seed{seed}.{k}": v for k, v in p.items() if k != "epoch"}, step=int(p["epoch"]))

        res = tune_and_test(model, data, cfg.rank, on_epoch=on_epoch)
        for r in res.runs:
            log.info("rank %s seed %d lr %g: valid auc %.4f (epoch %d) -> test auc %.4f gauc %.4f", model, r.seed,
                     r.lr, r.valid_metrics["auc"], r.best_epoch, r.metrics["auc"], r.metrics["gauc"])
            r.trained = None          # the bootstrap needs the test scores, not the weights
        row = summarize(res)
        run.params({"lr_chosen": res.lr})
        run.metrics({
            "auc": row["auc_mean"], "auc_std": row["auc_std"], "gauc": row["gauc_mean"], "gauc_std": row["gauc_std"],
            "logloss": row["logloss_mean"], "logloss_std": row["logloss_std"], "valid_auc": row["valid_auc_mean"],
            "train_samples_per_s": row["train_samples_per_s"], "n_params": float(row["n_params"])}
            | {f"valid_auc.lr{k}": v for k, v in res.valid_auc_by_lr.items()})
        curves = {model: [r.curves for r in res.runs]}
        with tempfile.TemporaryDirectory() as tmp:
            tracking.log_file(run, plot_curves(curves, Path(tmp) / f"curves_{model}.png"), "curves")
        run.json({"row": row, "curves": curves[model]}, f"rank/{model}.json")
    return {"row": row, "curves": curves[model], "result": res}


@task(name="rank-compare", **TASK_DEFAULTS)
def rank_compare(cfg: PipelineConfig, parent_run_id: str, data: RankData, results: list[dict],
                 refresh_run_id: str | None = None) -> tuple[list[dict], ComparisonScores]:
    """The comparison table with each model's test AUC difference to the best baseline on validation
    (paired bootstrap CI), and every model's curves in one PNG, on the flow's run. ``refresh_run_id``:
    the MLflow run of the refresh that published the inputs, which gets ``rank.<model>.auc``/``.gauc``
    and the AUC plot (so refreshes compare on ranking too). Returns the table and the chosen runs'
    test scores (logged as ``rank/test_scores.npz``, what ``rank_pool`` pools)."""
    table = [r["row"] for r in results]
    ref = add_differences(data, [r["result"] for r in results], table)
    arrays = comparison_score_arrays(data, [r["result"] for r in results], ref)
    curves = {r["row"]["model"]: r["curves"] for r in results}
    handle = tracking.run_handle(cfg, parent_run_id)
    handle.json({"table": table, "reference": ref}, "rank/comparison.json")
    handle.metrics({f"{row['model']}.auc": row["auc_mean"] for row in table}
                   | {f"{row['model']}.gauc": row["gauc_mean"] for row in table}
                   | {f"{row['model']}.auc_vs_ref.{k}": row["vs_ref"][k] for row in table if row.get("vs_ref")
                      for k in ("diff", "lo", "hi")}
                   | {f"{row['model']}.auc.{g}": v["auc_mean"] for row in table
                      for g, v in (row.get("by_history") or {}).items()})
    with tempfile.TemporaryDirectory() as tmp:
        tracking.log_file(handle, plot_curves(curves, Path(tmp) / "curves_all.png"), "curves")
        # every chosen run's test scores, so that comparisons of other snapshots on the same samples
        # can be pooled later without training again (`qarm rank pool`)
        scores = Path(tmp) / "test_scores.npz"
        np.savez_compressed(scores, **arrays)
        tracking.log_file(handle, scores, "rank")
    if refresh_run_id:
        try:
            refresh = tracking.run_handle(cfg, refresh_run_id)
            refresh.metrics({f"{tracking.RANK_HEADLINE}{row['model']}.{m}": row[f"{m}_mean"]
                             for row in table for m in ("auc", "gauc")})
            if cfg.tracking.plots:
                with tempfile.TemporaryDirectory() as tmp:
                    tracking.log_file(refresh, plot_report({"ranking": table}, tmp)["ranking"], "plots")
        except Exception as exc:        # e.g. the refresh's run lives in another tracking store
            get_run_logger().warning("could not add the ranking metrics to refresh run %s: %s", refresh_run_id, exc)
    return table, load_comparison_scores(arrays)


def read_pool_files(paths: list[str], stage: str = STAGE) -> list[ComparisonScores]:
    """The earlier comparisons' ``test_scores.npz`` to pool with this one, read before any work: a
    DataError names the file that cannot be read."""
    out = []
    for path in paths:
        try:
            out.append(read_comparison_scores(path))
        except ValueError as exc:
            raise DataError(stage, str(path), f"--pool-with: {exc}") from None
    return out


def check_pool_samples(data: RankData, pool: list[ComparisonScores], paths: list[str], stage: str = STAGE) -> None:
    """Refuse, before any model trains, comparisons measured on other ranking samples than ``data``'s
    (another config, data set or split): only comparisons on the same samples pool."""
    for scores, path in zip(pool, paths):
        if other_samples(data.user_id, data.label, scores):
            raise DataError(stage, str(path), "--pool-with: that comparison scored other ranking samples than this "
                                              "one (users or labels of its test rows differ: another data set, "
                                              "split or rank.samples config); only comparisons on the same "
                                              "samples pool")


@task(name="rank-pool", **TASK_DEFAULTS)
def rank_pool(cfg: PipelineConfig, parent_run_id: str, own: ComparisonScores, pool: list[ComparisonScores],
              paths: list[str], n_boot: int = 1000) -> dict:
    """This comparison pooled with earlier ones on the same samples (``pool_comparisons``, runs and
    test users resampled, against ``pooled_reference``: the best baseline by validation AUC averaged
    over the comparisons), logged as ``rank/pooled.json`` and ``pooled.<model>.auc_vs_ref.*`` metrics.
    Returns {reference, reference_rule, rows, sources, comparisons, error}: a model missing from an
    earlier comparison is left out of the pool; when no reference can be chosen, the pool is not made
    and ``error`` says why (this run's own comparison stands, so it is a warning)."""
    sources = ["this run", *map(str, paths)]
    try:
        ref, why = pooled_reference([own, *pool])
        _, rows = pool_comparisons([own, *pool], ref, n_boot=n_boot)
    except ValueError as exc:
        get_run_logger().warning("rank pool: not pooled: %s", exc)
        return {"reference": None, "reference_rule": None, "rows": [], "sources": sources,
                "comparisons": len(sources), "error": str(exc)}
    out = {"reference": ref, "reference_rule": why, "rows": rows, "sources": sources, "comparisons": len(sources),
           "error": None}
    handle = tracking.run_handle(cfg, parent_run_id)
    handle.json(out, "rank/pooled.json")
    handle.metrics({f"pooled.{r['model']}.auc_vs_ref.{k}": r["vs_ref"][k] for r in rows if r["vs_ref"]
                    for k in ("diff", "lo", "hi")} | {f"pooled.{r['model']}.auc": r["auc_mean"] for r in rows}
                   | {f"pooled.{r['model']}.{g}.auc_vs_ref.{k}": v["vs_ref"][k] for r in rows
                      for g, v in r["by_history"].items() if v["vs_ref"] for k in ("diff", "lo", "hi")})
    get_run_logger().info("rank pool: %d comparisons, %s", len(sources),
                          [(r["model"], None if r["vs_ref"] is None else round(100 * r["vs_ref"]["diff"], 2))
                           for r in rows])
    return out
