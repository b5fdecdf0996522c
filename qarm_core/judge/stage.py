"""Stage 2 as two calls: ``judge_stage`` (judge the mined pairs and measure the judge) and
``qa_stage`` (question/answer pairs for the items the training will see).

Both take the previous published table as a cache and return ``(table, report)``; the report holds
numbers only (counts, rates, seconds, AUCs) so it can go to MLflow as metrics, plus ``notes`` (text)
for anything that is not a number, such as why the evaluation was skipped.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qarm_core.errors import DataError
from qarm_core.judge.config import JudgeConfig, JudgeEvalConfig, QAConfig
from qarm_core.judge.judge import add_reasoning, judge_pairs, make_scorer, pairs_to_score

if TYPE_CHECKING:
    from qarm_core.judge.backends import LMBackend
    from qarm_core.judge.judge import PairScorer


def evaluate_judge(interactions: pa.Table, items: pa.Table, scorer: "PairScorer",
                   cfg: JudgeEvalConfig) -> tuple[dict[str, float], str | None]:
    """``({"auc.cooc": .., "auc.genre": .., "eval.pairs": ..}, None)`` on evaluation sets drawn
    from this run's interactions (user_id, item_id, rating) and items (item_id, title, tags), or
    ``({}, reason)`` when the data cannot supply them (no ratings, too few rated items)."""
    from qarm_core.judge.evaluate import EvalSetParams, build_eval_sets, scorer_auc

    if not cfg.enabled:
        return {}, "judge.eval.enabled is false"
    if "rating" not in interactions.column_names or interactions["rating"].null_count == interactions.num_rows:
        return {}, "the interactions carry no ratings (the evaluation sets are drawn from ratings)"
    if "tags" not in items.column_names:
        return {}, "the items carry no tags (the genre evaluation set needs them)"
    rated = interactions.filter(pc.is_valid(interactions["rating"]))
    users = np.unique(rated["user_id"].to_numpy())
    if len(users) > cfg.max_users:
        pick = np.random.default_rng([cfg.seed, 11]).choice(users, cfg.max_users, replace=False)
        rated = rated.filter(pc.is_in(rated["user_id"], pa.array(pick)))
    try:
        sets = build_eval_sets(rated, items, EvalSetParams(n_per_class=cfg.n_per_class, seed=cfg.seed,
                                                           min_item_ratings=cfg.min_item_ratings))
    except DataError as exc:
        return {}, exc.problem
    sets = {k: t for k, t in sets.items() if len(set(t["label"].to_pylist())) == 2}
    if not sets:
        return {}, "the evaluation sets came out without both classes"
    aucs = scorer_auc(sets, items, scorer)
    out = {f"auc.{k}": v for k, v in aucs.items()}
    out["eval.pairs"] = float(sum(t.num_rows for t in sets.values()))
    return out, None


def judge_stage(pairs: pa.Table, items: pa.Table, interactions: pa.Table | None, cfg: JudgeConfig,
                previous: pa.Table | None = None, scorer: "PairScorer | None" = None) -> tuple[pa.Table, dict]:
    """Judge every mined pair; returns the JUDGMENTS table (one row per distinct pair) and a report.

    ``pairs``: (n, src_item, dst_item, source, ...); ``items``: the catalog; ``interactions``: the
    log the evaluation sets are drawn from (None skips the evaluation); ``previous``: the last
    published judgments, whose scores are reused for pairs judged by the same model and prompt.
    Report: ``pairs``, ``pairs.scored`` (new this run), ``pairs.cached``, ``score_s``,
    ``pairs_per_s`` (scoring only), per source ``<source>.pairs/.kept/.keep_rate``,
    ``reasoning.rows`` (rows carrying reasoning), ``reasoning_s``, the evaluation's ``auc.<set>`` and ``notes``.
    """
    scorer = scorer or make_scorer(cfg)
    n_new = pairs_to_score(previous, pairs, scorer.model_id, cfg.prompt_version).num_rows
    t0 = time.perf_counter()
    # Reasoning (generation) is timed apart from scoring, so pairs/s measures the judge itself.
    out = judge_pairs(pairs, items, cfg.model_copy(update={"reasoning": "none"}), previous, scorer)
    score_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = add_reasoning(out, items, scorer.backend, cfg)
    reasoning_s = time.perf_counter() - t1
    report: dict = {"pairs": float(out.num_rows), "pairs.scored": float(n_new),
                    "pairs.cached": float(out.num_rows - n_new), "score_s": score_s,
                    "reasoning_s": reasoning_s,
                    "reasoning.rows": float(out.num_rows - out["reasoning"].null_count)}
    if n_new:
        report["pairs_per_s"] = n_new / max(score_s, 1e-9)
    source = np.asarray(out["source"].to_pylist(), dtype=object)
    keep = out["keep"].to_numpy(zero_copy_only=False)
    for s in sorted(set(source.tolist())):
        m = source == s
        report |= {f"{s}.pairs": float(m.sum()), f"{s}.kept": float(keep[m].sum()),
                   f"{s}.keep_rate": float(keep[m].mean())}
    notes: dict[str, str] = {"model_id": scorer.model_id, "prompt_version": cfg.prompt_version}
    if interactions is None:
        notes["eval"] = "skipped: no interactions given"
    else:
        t2 = time.perf_counter()
        aucs, why = evaluate_judge(interactions, items, scorer, cfg.eval)
        report |= aucs
        report["eval_s"] = time.perf_counter() - t2
        if why:
            notes["eval"] = f"skipped: {why}"
    report["notes"] = notes
    return out, report


def qa_item_ids(judgments: pa.Table, items: pa.Table, mode: str) -> list[int]:
    """Which items get QA: ``"kept_pairs"``, the items of kept judged pairs (the ones training
    reads); ``"all"``, the whole catalog. Sorted, distinct."""
    if mode == "all":
        return sorted(set(items["item_id"].to_pylist()))
    if mode != "kept_pairs":
        raise ValueError(f"unknown QA item selection {mode!r}")
    kept = judgments.filter(pc.fill_null(judgments["keep"], False))
    return sorted(set(kept["src_item"].to_pylist()) | set(kept["dst_item"].to_pylist()))


def qa_stage(items: pa.Table, cfg: QAConfig, item_ids: Iterable[int], previous: pa.Table | None = None,
             backend: "LMBackend | None" = None) -> tuple[pa.Table, dict]:
    """QA rows (``schemas.QA``) for ``item_ids``; items answered in ``previous`` by the same model
    and prompt are copied. Report: ``items``, ``items.generated``, ``questions``,
    ``llm_answers_kept``, ``llm_answer_rate``, ``generate_s``, ``items_per_s``."""
    from qarm_core.judge.qa import QAStats, generate_qa

    if backend is None:
        from qarm_core.judge.backends import make_backend

        backend = make_backend(cfg.backend, cfg.local, cfg.http)
    ids = sorted({int(i) for i in item_ids})
    stats = QAStats()
    t0 = time.perf_counter()
    table = generate_qa(items, backend, cfg, previous=previous, item_ids=ids, stats=stats)
    seconds = time.perf_counter() - t0
    report = {"items": float(len(ids)), "items.generated": float(stats.items),
              "questions": float(stats.questions), "llm_answers_kept": float(stats.llm_answers_kept),
              "fallbacks": float(stats.fallbacks), "generate_s": seconds,
              "notes": {"model_id": backend.model_id, "prompt_version": cfg.prompt_version}}
    if stats.questions:
        report["llm_answer_rate"] = stats.llm_answers_kept / stats.questions
    if stats.items:
        report["items_per_s"] = stats.items / max(seconds, 1e-9)
    return table, report
