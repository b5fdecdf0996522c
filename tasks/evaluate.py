"""Evaluate tasks: each section of ``qarm_core.evaluation`` on the published snapshot, logged to one
MLflow run per section under the evaluate flow's run, then report.md and its plots."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task

from qarm_core.arrays import sorted_unique
from qarm_core.config import PipelineConfig
from qarm_core.errors import DataError
from qarm_core.evaluation import embedding_table, judge_ablation, judge_table, plot_report, quantizer_table, render_report
from qarm_core.split import cutoffs_from_periods
from qarm_core.storage import Storage, read_dataset
from tasks import tracking
from tasks.common import TASK_DEFAULTS

STAGE = "evaluate"
NEEDED = ("interactions", "items", "periods", "train_events", "valid_events", "embeddings", "codes", "judgments",
          "judge_eval")


def _flat(rows: list[dict], key: str) -> dict[str, float]:
    """MLflow metrics ``<row[key]>.<field>`` of the numeric fields of ``rows``."""
    return {f"{r[key]}.{k}".replace(" ", "_"): float(v) for r in rows for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


@task(name="evaluate-inputs", **TASK_DEFAULTS)
def evaluation_inputs(cfg: PipelineConfig) -> dict:
    """The published snapshot's records and the periods of its split (a DataError names what is missing)."""
    storage = Storage(cfg.home)
    snap = storage.current()
    if snap is None:
        raise DataError(STAGE, "snapshot", f"no published snapshot under {cfg.home}: run qarm refresh first")
    missing = [n for n in NEEDED if n not in snap.manifest.get("datasets", {})]
    if missing:
        raise DataError(STAGE, missing[0], f"snapshot {snap.snapshot_id} lacks {missing}: it is an inputs snapshot "
                                           "of `qarm ingest` (or from an older qarm); run qarm refresh "
                                           "(--set ingest.source=published for the ingested data)")
    records = {n: snap.record(n) for n in NEEDED}
    periods = read_dataset(records["periods"])
    cut = cutoffs_from_periods(periods)
    # the held-out events, read once for every section: validation from the split's own dataset,
    # test from the log (the refresh never wrote it apart)
    inter = read_dataset(records["interactions"])
    test = inter.filter(pa.array(cut.period_of(inter["ts"].to_numpy()) == 2))
    return {"snapshot_id": snap.snapshot_id, "records": records, "cutoffs": cut, "periods": periods.to_pylist(),
            "events": {"valid": read_dataset(records["valid_events"]), "test": test}}


@task(name="evaluate-embeddings", **TASK_DEFAULTS)
def evaluate_embeddings(cfg: PipelineConfig, parent_run_id: str, inputs: dict) -> list[dict]:
    """Recall@10/50 of future co-occurrence for the published embeddings, the base model and MiniLM."""
    from qarm_core.embed.embed import embed_catalog, embed_catalog_minilm
    from qarm_core.hashing import stable_hash
    from qarm_core.quantize.io import read_embeddings

    storage = Storage(cfg.home)
    rec = inputs["records"]
    items = read_dataset(rec["items"])
    work = storage.run_dir("evaluate", stable_hash({"items": rec["items"].fingerprint,
                                                    "model": cfg.embed.model.model_dump(mode="json")}))
    embeddings = {"published (fine-tuned)": read_embeddings(rec["embeddings"].path)}
    if "base" in cfg.embed.baselines:
        embeddings["base"] = read_embeddings(embed_catalog(items, work / "base", cfg.embed.model, cfg.embed.infer).path)
    if "minilm" in cfg.embed.baselines:
        embeddings["minilm"] = read_embeddings(embed_catalog_minilm(items, work / "minilm", cfg.embed.infer).path)
    train_items = sorted_unique(read_dataset(rec["train_events"], columns=["item_id"])["item_id"].to_numpy())
    rows = embedding_table(embeddings, train_items, inputs["events"], cfg.events.positive_min_rating,
                           max_pairs=cfg.embed.eval_max_pairs)
    with tracking.stage_run(cfg, parent_run_id, "evaluate-embeddings") as run:
        run.metrics(_flat([{**r, "key": f"{r['period']}.{r['model']}"} for r in rows], "key"))
        run.json(rows, "evaluation/embeddings.json")
    get_run_logger().info("evaluate embeddings: %s", [(r["period"], r["model"], round(r.get("recall_at_10", 0), 4))
                                                      for r in rows])
    return rows


@task(name="evaluate-judge", **TASK_DEFAULTS)
def evaluate_judge(cfg: PipelineConfig, parent_run_id: str, inputs: dict) -> tuple[list[dict], list[dict]]:
    """The judge's measured rejection rates, its test AUC on the mined pairs, and the ablation."""
    rec = inputs["records"]
    test = inputs["events"]["test"]
    judgments = read_dataset(rec["judgments"])
    rows = judge_table(judgments, test, cfg.events.positive_min_rating)
    ev = read_dataset(rec["judge_eval"])
    ev = ev.filter(pc.equal(ev["prompt_version"], cfg.judge.prompt_version)) if ev.num_rows else ev
    ablation = judge_ablation(ev, test, cfg.events.positive_min_rating, cfg.judge.embed_weight, cfg.judge.tag_weight)
    with tracking.stage_run(cfg, parent_run_id, "evaluate-judge") as run:
        run.metrics(_flat(rows, "source") | _flat(ablation, "term"))
        run.json({"sources": rows, "ablation": ablation}, "evaluation/judge.json")
    return rows, ablation


@task(name="evaluate-quantizer", **TASK_DEFAULTS)
def evaluate_quantizer(cfg: PipelineConfig, parent_run_id: str, inputs: dict) -> list[dict]:
    """Residual k-means alone vs + FSQ at equal code space on the published embeddings, 3 seeds."""
    from qarm_core.quantize.io import read_embeddings

    _, x = read_embeddings(inputs["records"]["embeddings"].path)
    q = cfg.quantize
    rows = quantizer_table(x, tuple(q.levels), q.fsq_dims, q.fsq_levels)
    with tracking.stage_run(cfg, parent_run_id, "evaluate-quantizer") as run:
        run.metrics(_flat(rows, "variant"))
        run.json(rows, "evaluation/quantizer.json")
    return rows


@task(name="evaluate-report", **TASK_DEFAULTS)
def write_report(cfg: PipelineConfig, parent_run_id: str, inputs: dict, sections: dict, command: str,
                 out_dir: str | None = None, overwrite: bool = False) -> str:
    """report.md and the PNGs into ``out_dir`` (default ``<home>/reports/<snapshot_id>``), and onto the
    flow's MLflow run. Returns the report's path. A user's ``out_dir`` is written like every CLI
    ``--out`` (``storage.staged_output``: never a folder that is not an earlier qarm output, and an
    earlier one only with ``overwrite``)."""
    import contextlib
    from pathlib import Path

    from qarm_core.devices import hardware_summary
    from qarm_core.storage import staged_output

    if out_dir:
        target, staged = Path(out_dir), staged_output(Path(out_dir), "folder", overwrite, STAGE)
    else:
        target = Storage(cfg.home).report_dir(inputs["snapshot_id"])
        target.mkdir(parents=True, exist_ok=True)
        staged = contextlib.nullcontext(target)
    with staged as folder:
        path, plots = _write_report_files(Path(folder), inputs, sections, command, hardware_summary())
    path, plots = target / path.name, {k: target / v.name for k, v in plots.items()}
    handle = tracking.run_handle(cfg, parent_run_id)
    for p in [path, *plots.values()]:
        tracking.log_file(handle, p, "evaluation")
    get_run_logger().info("evaluation report: %s", path)
    return str(path)


def _write_report_files(folder, inputs: dict, sections: dict, command: str, machine: str):
    plots = plot_report(sections, folder)
    cut = inputs["cutoffs"]
    periods = "; ".join(f"{p['period']} {p['events']:,} events / {p['users']:,} users" for p in inputs["periods"])
    text = render_report(sections, {"snapshot_id": inputs["snapshot_id"], "command": command, "machine": machine,
                                    "periods": f"{periods} (valid from {cut.valid_start}, test from {cut.test_start})"},
                         plots)
    path = folder / "report.md"
    path.write_text(text)
    return path, plots
