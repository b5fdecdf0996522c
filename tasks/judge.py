"""Judge and QA tasks (stage 2): score every mined pair with the LLM judge, then write QA pairs."""

from __future__ import annotations

from prefect import get_run_logger, task

from qarm_core import __version__
from qarm_core.config import PipelineConfig
from qarm_core.hashing import stable_hash
from qarm_core.gates import judge_quality_gate
from qarm_core.judge.stage import JudgeTables, judge_stage, qa_item_ids, qa_stage
from qarm_core.schemas import JUDGMENTS, QA, SCHEMAS
from qarm_core.storage import DatasetRecord, Storage, read_dataset, write_stage_outputs
from tasks import tracking
from tasks.common import TASK_DEFAULTS


def _previous(storage: Storage, dataset: str):
    """The last published table of ``dataset``: the cache a daily refresh reuses."""
    rec = storage.published(dataset)
    return (read_dataset(rec) if rec is not None else None), rec


def _log(run: tracking.StageRun, report: dict, records: dict[str, DatasetRecord], reused: bool) -> None:
    run.metrics({k: v for k, v in report.items() if isinstance(v, (int, float))}
                | {f"rows.{n}": r.rows for n, r in records.items()} | {"reused": float(reused)})
    run.tags({f"qarm.{k}": v for k, v in report.get("notes", {}).items()})


# The judge stage's datasets, in ``JudgeTables`` field order; each is also the next run's cache.
JUDGE_TABLES = ("judgments", "judge_eval", "judge_neutral")


def _published_judge_tables(storage: Storage) -> JudgeTables:
    """The judge tables of the published snapshot (empty where it has none): the caches."""
    empty, got = JudgeTables.empty(), {}
    for name in JUDGE_TABLES:
        table, _ = _previous(storage, name)
        got[name] = table if table is not None else getattr(empty, name)
    return JudgeTables(**got)


@task(name="judge-pairs", **TASK_DEFAULTS)
def judge(cfg: PipelineConfig, parent_run_id: str, pairs: DatasetRecord, items: DatasetRecord,
          interactions: DatasetRecord) -> dict[str, DatasetRecord]:
    """Stage ``judgments``: one per mined pair, with score, keep verdict and (sampled) reasoning;
    ``judge_eval``: the scored evaluation pairs; ``judge_neutral``: each item's neutral pass.

    Pairs judged, evaluation pairs scored and neutral passes run in the published snapshot by the
    same model and prompt, on the same text, are not run again. The judge's AUC on evaluation sets
    drawn from ``interactions`` is logged and, when ``judge.eval.min_auc`` is set, gates the run.
    """
    storage = Storage(cfg.home)
    prev_rec = storage.published("judgments")
    previous = _published_judge_tables(storage)
    # The previous snapshot is only a cache (same inputs give the same judgments), so it is not
    # part of the key; reasoning samples and scores are deterministic for a given model.
    key = stable_hash({"pairs": pairs.fingerprint, "items": items.fingerprint,
                       "interactions": interactions.fingerprint, "judge": cfg.judge.model_dump(mode="json"),
                       "qarm": __version__, "schemas": [SCHEMAS[n].version for n in JUDGE_TABLES]})
    report: dict = {}
    out: dict = {}

    def produce():
        tables, rep = judge_stage(read_dataset(pairs), read_dataset(items),
                                  read_dataset(interactions, columns=["user_id", "item_id", "rating"]),
                                  cfg.judge, previous=previous)
        out["tables"] = tables
        report.update(rep)
        return iter(tables.judgments.to_batches(max_chunksize=1_000_000))

    def written(name: str):
        return lambda: iter(getattr(out["tables"], name).to_batches(max_chunksize=1_000_000))

    with tracking.stage_run(cfg, parent_run_id, "judge") as run:
        outputs = {"judgments": (JUDGMENTS, produce)} | {n: (SCHEMAS[n], written(n)) for n in JUDGE_TABLES[1:]}
        records, reused, report = write_stage_outputs(storage, "judge", key, outputs, report)
        run.params({"judge": cfg.judge.model_dump(mode="json"), "key": key,
                    "previous": prev_rec.path if prev_rec else "none"})
        _log(run, report, records, reused)
        quality = judge_quality_gate("judge", report, cfg.judge.eval.min_auc, report.get("notes", {}).get("eval"))
        run.gate(quality)
        get_run_logger().info(
            "judge: %s pairs (%s new, %s LLM passes with the evaluation, %s/s), keep %s, AUC %s",
            f"{records['judgments'].rows:,}", f"{report.get('pairs.scored', 0):,.0f}",
            f"{report.get('llm.pairs', 0):,.0f}", f"{report.get('pairs_per_s', 0):.1f}",
            ", ".join(f"{s}={report[f'{s}.keep_rate']:.2f}" for s in ("swing", "u2i") if f"{s}.keep_rate" in report),
            ", ".join(f"{k[4:]}={v:.3f}" for k, v in report.items() if k.startswith("auc.")) or
            report.get("notes", {}).get("eval", "n/a"))
        quality.raise_if_failed()
    return records


@task(name="qa-pairs", **TASK_DEFAULTS)
def qa(cfg: PipelineConfig, parent_run_id: str, judgments: DatasetRecord, items: DatasetRecord
       ) -> dict[str, DatasetRecord]:
    """Stage ``qa``: K question/answer pairs per item (of the kept pairs, or all, by ``qa.items``);
    items answered in the published snapshot by the same model and prompt are copied."""
    storage = Storage(cfg.home)
    previous, prev_rec = _previous(storage, "qa")
    key = stable_hash({"judgments": judgments.fingerprint, "items": items.fingerprint,
                       "qa": cfg.qa.model_dump(mode="json"), "qarm": __version__, "schema": QA.version})
    report: dict = {}

    def produce():
        catalog = read_dataset(items)
        ids = qa_item_ids(read_dataset(judgments, columns=["src_item", "dst_item", "keep"]), catalog, cfg.qa.items)
        table, rep = qa_stage(catalog, cfg.qa, ids, previous=previous)
        report.update(rep)
        return iter(table.to_batches(max_chunksize=1_000_000))

    with tracking.stage_run(cfg, parent_run_id, "qa") as run:
        records, reused, report = write_stage_outputs(storage, "qa", key, {"qa": (QA, produce)}, report)
        run.params({"qa": cfg.qa.model_dump(mode="json"), "key": key,
                    "previous": prev_rec.path if prev_rec else "none"})
        _log(run, report, records, reused)
        get_run_logger().info("qa: %s rows for %s items (%s generated, LLM answers kept %s)",
                              f"{records['qa'].rows:,}", f"{report.get('items', 0):,.0f}",
                              f"{report.get('items.generated', 0):,.0f}",
                              f"{report.get('llm_answer_rate', float('nan')):.0%}")
    return records
