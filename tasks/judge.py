"""Judge and QA tasks (stage 2): score every mined pair with the LLM judge, then write QA pairs."""

from __future__ import annotations

from prefect import task

from qarm_core.config import PipelineConfig
from qarm_core.gates import judge_quality_gate
from qarm_core.judge.stage import JudgeTables, judge_stage, qa_item_ids, qa_stage
from qarm_core.plots import plot_judge_scores
from qarm_core.schemas import SCHEMAS
from qarm_core.storage import CURRENT_AT_READ, DatasetRecord, Storage, read_dataset
from tasks import tracking
from tasks.common import TASK_DEFAULTS, StageSpec, published_table, run_stage
from tasks.embed import reuses_model
from tasks.executor import shard_runner

# The judge stage's datasets, in ``JudgeTables`` field order; each is also the next run's cache.
JUDGE_TABLES = ("judgments", "judge_eval", "judge_neutral")


def _published_judge_tables(storage: Storage) -> JudgeTables:
    """The judge tables of the published snapshot (empty where it has none): the caches."""
    empty, got = JudgeTables.empty(), {}
    for name in JUDGE_TABLES:
        table, _ = published_table(storage, name)
        got[name] = table if table is not None else getattr(empty, name)
    return JudgeTables(**got)


def _judge_summary(records: dict[str, DatasetRecord], report: dict) -> str:
    keep = ", ".join(f"{s}={report[f'{s}.keep_rate']:.2f} ({report.get('notes', {}).get(f'{s}.keep_rule', '')})"
                     for s in ("swing", "u2i") if f"{s}.keep_rate" in report)
    auc = (", ".join(f"{k[4:]}={v:.3f}" for k, v in report.items() if k.startswith("auc."))
           or report.get("notes", {}).get("eval", "n/a"))
    return (f"judge: {records['judgments'].rows:,} pairs ({report.get('pairs.scored', 0):,.0f} new, "
            f"{report.get('llm.pairs', 0):,.0f} LLM passes with the evaluation, "
            f"{report.get('pairs_per_s', 0):.1f}/s), keep {keep}, AUC {auc}")


@task(name="judge-pairs", **TASK_DEFAULTS)
def judge(cfg: PipelineConfig, parent_run_id: str, pairs: DatasetRecord, items: DatasetRecord,
          events: DatasetRecord, valid_events: DatasetRecord,
          parent: str | None = CURRENT_AT_READ) -> dict[str, DatasetRecord]:
    """Stage ``judgments``: one per mined pair, with score, keep verdict and (sampled) reasoning;
    ``judge_eval``: the scored evaluation pairs; ``judge_neutral``: each item's neutral pass.

    Pairs judged, evaluation pairs scored and neutral passes run in the published snapshot by the
    same model and prompt, on the same text, are not run again. The judge's AUC on evaluation sets
    drawn from ``events`` (the training period's) is logged and, when ``judge.eval.min_auc`` is set, gates the run.
    Calibrated keep rules choose their thresholds on ``valid_events`` (the validation period's
    co-occurrence), so each source's rejection rate is measured. ``parent``: the snapshot whose
    caches are read (a refresh's, chosen at its start).
    """
    storage = Storage(cfg.home).as_of(parent)
    prev_rec = storage.published("judgments")

    def produce():
        with shard_runner(cfg) as shards:
            tables, report = judge_stage(read_dataset(pairs), read_dataset(items),
                                         read_dataset(events, columns=["user_id", "item_id", "rating"]),
                                         cfg.judge, previous=_published_judge_tables(storage),
                                         valid_events=read_dataset(valid_events),
                                         min_rating=cfg.events.positive_min_rating, shards=shards)
        report.setdefault("notes", {})["executor"] = cfg.executor.kind
        return {name: getattr(tables, name) for name in JUDGE_TABLES}, report

    def gate(run, records, report) -> None:
        if cfg.tracking.plots:
            thresholds = {s: report[f"{s}.threshold"] for s in ("swing", "u2i") if f"{s}.threshold" in report}
            tracking.log_plot(tracking.run_handle(cfg, parent_run_id), plot_judge_scores,
                              read_dataset(records["judgments"], columns=["source", "score", "keep"]),
                              name="judge_scores.png", thresholds=thresholds)
        quality = judge_quality_gate("judge", report, cfg.judge.eval.min_auc, report.get("notes", {}).get("eval"))
        run.gate(quality)
        quality.raise_if_failed()

    # The previous snapshot is only a cache (same inputs give the same judgments), so it is not
    # part of the key; reasoning samples and scores are deterministic for a given model.
    records, _ = run_stage(cfg, parent_run_id, StageSpec(
        name="judge", outputs={n: SCHEMAS[n] for n in JUDGE_TABLES}, produce=produce,
        key_inputs={"pairs": pairs.fingerprint, "items": items.fingerprint,
                    "events": events.fingerprint, "valid_events": valid_events.fingerprint,
                    "positive_rule": cfg.events.model_dump(mode="json"), "judge": cfg.judge.model_dump(mode="json")},
        params={"judge": cfg.judge.model_dump(mode="json"), "previous": prev_rec.path if prev_rec else "none"},
        after=gate, summary=_judge_summary))
    return records


@task(name="qa-pairs", **TASK_DEFAULTS)
def qa(cfg: PipelineConfig, parent_run_id: str, judgments: DatasetRecord | None, items: DatasetRecord,
       parent: str | None = CURRENT_AT_READ) -> dict[str, DatasetRecord]:
    """Stage ``qa``: K question/answer pairs per item (of the kept pairs, or all, by ``qa.items``);
    items answered in the published snapshot by the same model and prompt are copied. A run that
    reuses the published model (it trains nothing, and only training reads QA) asks nothing new
    with ``qa.when_model_reused: defer``: it publishes the rows still valid and counts the deferred
    items, which the next run that trains answers.
    ``judgments``: the judge's verdicts, None when QA needs none (``qa.needs_judgments``);
    ``parent``: the snapshot whose QA is reused."""
    storage = Storage(cfg.home).as_of(parent)
    previous, prev_rec = published_table(storage, "qa")
    if cfg.qa.needs_judgments and judgments is None:
        raise ValueError("stage qa: qa.items=kept_pairs needs the judge's verdicts (judgments)")
    verdicts = judgments if cfg.qa.needs_judgments else None     # nor is the cache keyed by them
    # with no published QA the rows are written anyway: the snapshot always holds a QA table
    defer = cfg.qa.when_model_reused == "defer" and prev_rec is not None \
        and reuses_model(cfg, storage.published("model"))

    def produce():
        catalog = read_dataset(items)
        kept = read_dataset(verdicts, columns=["src_item", "dst_item", "keep"]) if verdicts else None
        ids = qa_item_ids(kept, catalog, cfg.qa.items)
        with shard_runner(cfg) as shards:
            table, report = qa_stage(catalog, cfg.qa, ids, previous=previous, shards=shards, defer=defer)
        report.setdefault("notes", {})["executor"] = cfg.executor.kind
        return {"qa": table}, report

    records, _ = run_stage(cfg, parent_run_id, StageSpec(
        name="qa", outputs={"qa": SCHEMAS["qa"]}, produce=produce,
        # a deferring run's rows are those of the published QA still valid: that table is an input then
        key_inputs={"judgments": verdicts.fingerprint if verdicts else None, "items": items.fingerprint,
                    "qa": cfg.qa.model_dump(mode="json"), "deferred_from": prev_rec.fingerprint if defer else None},
        params={"qa": cfg.qa.model_dump(mode="json"), "previous": prev_rec.path if prev_rec else "none",
                "defer": defer},     # asked for: the stage answers anyway when no published row stays valid
        summary=_qa_summary))
    return records


def _qa_summary(recs: dict[str, DatasetRecord], rep: dict) -> str:
    line = f"qa: {recs['qa'].rows:,} rows for {rep.get('items', 0):,.0f} items ({rep.get('items.generated', 0):,.0f} generated"
    if "items.deferred" in rep:
        return line + (f", {rep['items.deferred']:,.0f} deferred to the next run that trains: the published model "
                       f"is reused)")
    return line + f", LLM answers kept {rep.get('llm_answer_rate', float('nan')):.0%})"
