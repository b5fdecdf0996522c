"""Stage 2 as two calls: ``judge_stage`` (judge the mined pairs and measure the judge) and
``qa_stage`` (question/answer pairs for the items the training will see).

Both take the previous published table as a cache and return ``(table, report)``; the report holds
numbers only (counts, rates, seconds, AUCs) so it can go to MLflow as metrics, plus ``notes`` (text)
for anything that is not a number, such as why the evaluation was skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qarm_core.arrays import sorted_unique
from qarm_core.errors import DataError
from qarm_core.events import POSITIVE_MIN_RATING
from qarm_core.judge.config import JudgeConfig, JudgeEvalConfig, QAConfig
from qarm_core.judge.calibrate import calibrate_keep_rules, future_labels
from qarm_core.judge.judge import (CACHE_KEY, SOURCES, add_reasoning, apply_keep_rules, judge_pairs, keyed_pairs,
                                   make_scorer, pair_text_hashes, pairs_to_score)
from qarm_core.schemas import JUDGE_EVAL, JUDGE_NEUTRAL, JUDGMENTS

if TYPE_CHECKING:
    from qarm_core.executor import ShardRunner
    from qarm_core.lm.backend import LMBackend
    from qarm_core.judge.judge import PairScorer


def _dtype_notes(backend: object) -> dict[str, str]:
    """The numeric type a local backend runs in, why, and on how many CPU threads (an HTTP backend
    has none to report); for a local model in this process, how its rows run (``LocalLM``)."""
    from qarm_core.devices import thread_note

    choice = getattr(backend, "dtype_choice", None)
    notes = {} if choice is None else {"dtype": choice.name, "dtype_reason": choice.reason, "threads": thread_note()}
    if getattr(backend, "model", None) is not None and hasattr(backend, "shared_prefix"):
        notes["rows"] = "packed, prefix read in place" if backend.shared_prefix else "padded, prefix copied per row"
    return notes


def draw_eval_pairs(interactions: pa.Table, items: pa.Table, cfg: JudgeEvalConfig) -> tuple[pa.Table | None, str | None]:
    """``(table, None)``: the evaluation pairs (eval_set, src_item, dst_item, label) drawn from this
    run's interactions (user_id, item_id, rating) and items (item_id, title, tags), or
    ``(None, reason)`` when the data cannot supply them (no ratings, too few rated items)."""
    from qarm_core.judge.evaluate import EvalSetParams, build_eval_sets

    if not cfg.enabled:
        return None, "judge.eval.enabled is false"
    if "rating" not in interactions.column_names or interactions["rating"].null_count == interactions.num_rows:
        return None, "the interactions carry no ratings (the evaluation sets are drawn from ratings)"
    if "tags" not in items.column_names:
        return None, "the items carry no tags (the genre evaluation set needs them)"
    rated = interactions.filter(pc.is_valid(interactions["rating"]))
    users = sorted_unique(rated["user_id"].to_numpy())
    if len(users) > cfg.max_users:
        # a hash, not a draw: a growing log keeps the users it had sampled (stable eval pairs)
        from qarm_core.hashing import keyed_hash

        pick = users[np.argsort(keyed_hash(cfg.seed, 11, users), kind="stable")[: cfg.max_users]]
        rated = rated.filter(pc.is_in(rated["user_id"], pa.array(pick)))
    try:
        sets = build_eval_sets(rated, items, EvalSetParams(n_per_class=cfg.n_per_class, seed=cfg.seed,
                                                           min_item_ratings=cfg.min_item_ratings))
    except DataError as exc:
        return None, exc.problem
    sets = {k: t for k, t in sets.items() if len(set(t["label"].to_pylist())) == 2}
    if not sets:
        return None, "the evaluation sets came out without both classes"
    return pa.concat_tables([pa.table({"eval_set": pa.array([k] * t.num_rows, pa.string()),
                                       "src_item": t["src_item"], "dst_item": t["dst_item"], "label": t["label"]})
                             for k, t in sets.items()]), None


@dataclass(frozen=True)
class _EvalPlan:
    """Evaluation pairs with the hash of their texts, the rows the cache answers, and the rest."""

    wanted: pa.Table                  # eval_set, src_item, dst_item, label, text_hash
    keys: list[tuple]                 # (eval_set, src, dst, text_hash) per row
    cached: dict[tuple, dict]         # key -> previous row
    todo: list[int]                   # rows to score

    def todo_pairs(self) -> pa.Table:
        return self.wanted.select(["src_item", "dst_item"]).take(pa.array(self.todo, pa.int64()))


def _plan_eval(eval_pairs: pa.Table, items: pa.Table, scorer: "PairScorer", previous: pa.Table | None) -> _EvalPlan:
    hashes = pair_text_hashes(eval_pairs, items, scorer.prompt.item_format)
    wanted = eval_pairs.append_column("text_hash", pa.array(hashes, pa.string()))
    keys = list(zip(wanted["eval_set"].to_pylist(), wanted["src_item"].to_pylist(), wanted["dst_item"].to_pylist(),
                    wanted["text_hash"].to_pylist()))
    cached: dict[tuple, dict] = {}
    if previous is not None and previous.num_rows:
        missing = [c for c in JUDGE_EVAL.columns if c not in previous.column_names]
        if missing:
            raise DataError("judge", "judge_eval", f"previous evaluation table lacks columns {missing}")
        prev = previous.filter(pc.and_(pc.equal(previous["components_id"], scorer.components_id),
                                       pc.equal(previous["prompt_version"], scorer.prompt.version)))
        want = set(keys)
        for r in prev.to_pylist():
            k = (r["eval_set"], r["src_item"], r["dst_item"], r["text_hash"])
            if k in want:
                cached[k] = r
    return _EvalPlan(wanted, keys, cached, [i for i, k in enumerate(keys) if k not in cached])


def _finish_eval(plan: _EvalPlan, items: pa.Table, scorer: "PairScorer") -> tuple[dict[str, float], pa.Table]:
    from qarm_core.judge.evaluate import auc
    from qarm_core.judge.judge import pair_components

    parts = pair_components(plan.todo_pairs(), items, scorer, "evaluation pairs") if plan.todo else {}
    at = {i: j for j, i in enumerate(plan.todo)}
    cols: dict[str, list] = {c: [] for c in ("pmi", "cos", "tag_cos")}
    for i, k in enumerate(plan.keys):
        for c, vals in cols.items():
            if k in plan.cached:
                vals.append(plan.cached[k][c])
            else:
                v = parts.get(c)
                vals.append(float(v[at[i]]) if v is not None and len(v) else None)
    w, n = plan.wanted, plan.wanted.num_rows
    table = pa.table({
        **{c: w[c] for c in ("eval_set", "src_item", "dst_item", "label")},
        **{c: pa.array(v, pa.float64()) for c, v in cols.items()},
        "components_id": pa.array([scorer.components_id] * n, pa.string()),
        "prompt_version": pa.array([scorer.prompt.version] * n, pa.string()),
        "text_hash": w["text_hash"]}, schema=JUDGE_EVAL.schema)
    score = scorer.combine({c: np.asarray([np.nan if x is None else x for x in v], np.float64)
                            for c, v in cols.items()})
    sets = np.asarray(w["eval_set"].to_pylist(), dtype=object)
    labels = w["label"].to_numpy()
    out = {f"auc.{k}": auc(labels[sets == k], score[sets == k]) for k in sorted(set(sets.tolist()))}
    out["eval.pairs"] = float(n)
    out["eval.pairs.cached"] = float(n - len(plan.todo))
    return out, table


def evaluate_judge(eval_pairs: pa.Table, items: pa.Table, scorer: "PairScorer",
                   previous: pa.Table | None = None) -> tuple[dict[str, float], pa.Table]:
    """The judge's AUC on each evaluation set, and the scored pairs (``schemas.JUDGE_EVAL``).

    ``eval_pairs``: (eval_set, src_item, dst_item, label) from ``draw_eval_pairs``. The score terms
    of a pair found in ``previous`` (same term models, prompt, set, items and item text) are
    reused; the others are computed (or taken from what ``scorer`` already computed in this run).
    Returns ``({"auc.<set>": .., "eval.pairs": .., "eval.pairs.cached": ..}, table)``.
    """
    return _finish_eval(_plan_eval(eval_pairs, items, scorer, previous), items, scorer)


@dataclass(frozen=True)
class JudgeTables:
    """What the judge stage writes, and what it reads back from the last published run as caches:
    ``judgments`` (``schemas.JUDGMENTS``), ``judge_eval`` (the scored evaluation pairs) and
    ``judge_neutral`` (each item's neutral-pass log-likelihood)."""

    judgments: pa.Table
    judge_eval: pa.Table
    judge_neutral: pa.Table

    @classmethod
    def empty(cls) -> "JudgeTables":
        return cls(JUDGMENTS.schema.empty_table(), JUDGE_EVAL.schema.empty_table(), JUDGE_NEUTRAL.schema.empty_table())


def _neutral_plan(items: pa.Table, item_ids: Iterable[int], scorer: "PairScorer",
                  previous: pa.Table | None) -> tuple[dict[int, str], dict[int, str], int, pa.Table]:
    """({item: text}, {item: text hash}, how many of these items had their neutral value in
    ``previous``, ``previous``'s rows for this LLM and prompt) for the items that may be scored as B
    this run; neutral values of ``previous`` for the same LLM, prompt and text are handed to
    ``scorer`` so their neutral pass is not run again."""
    from qarm_core.hashing import text_hash
    from qarm_core.lm.text import render_items

    texts = render_items(items, set(item_ids), scorer.prompt.scored_format)     # B as the LLM scores it
    hashes = {i: text_hash(scorer.continuation(t)) for i, t in texts.items()}
    loaded = 0
    prev = JUDGE_NEUTRAL.schema.empty_table()
    if previous is not None and previous.num_rows:
        missing = [c for c in JUDGE_NEUTRAL.columns if c not in previous.column_names]
        if missing:
            raise DataError("judge", "judge_neutral", f"previous neutral table lacks columns {missing}")
        prev = previous.filter(pc.and_(pc.equal(previous["model_id"], scorer.backend.model_id),
                                       pc.equal(previous["prompt_version"], scorer.prompt.version)))
        known = dict(zip(prev["text_hash"].to_pylist(), prev["neutral"].to_pylist()))
        hit = {i: known[h] for i, h in hashes.items() if h in known}
        scorer.preload_neutral({scorer.continuation(texts[i]): v for i, v in hit.items()})
        loaded = len(hit)     # items, not texts: items that share a text share one neutral pass
    return texts, hashes, loaded, prev.select(JUDGE_NEUTRAL.columns)


def _neutral_table(texts: dict[int, str], hashes: dict[int, str], scorer: "PairScorer",
                   carried: pa.Table, catalog_ids: pa.Array) -> pa.Table:
    """One row per item: this run's items B (their value under today's text), then the rows of
    ``carried`` (the last run's, same LLM and prompt) for the other items still in the catalog.
    Carrying them keeps the cache the whole catalog's, not the day's: an item that is B on one
    day, not the next, and B again on a third is not passed again (``bench_daily.py``'s week: 13-34%
    fewer neutral passes a day from day 2). Bounded by the catalog: rows of removed
    items are dropped, and a row whose item's text changed since is never matched (it is looked up
    by text hash) and is replaced when the item is next B."""
    rows = sorted((i, hashes[i], v) for i, t in texts.items() if (v := scorer.neutral_of(t)) is not None)
    n = len(rows)
    today = pa.table({"item_id": pa.array([r[0] for r in rows], pa.int64()),
                      "text_hash": pa.array([r[1] for r in rows], pa.string()),
                      "neutral": pa.array([r[2] for r in rows], pa.float64()),
                      "model_id": pa.array([scorer.backend.model_id] * n, pa.string()),
                      "prompt_version": pa.array([scorer.prompt.version] * n, pa.string())},
                     schema=JUDGE_NEUTRAL.schema)
    if not carried.num_rows:
        return today
    others = carried.filter(pc.and_(pc.invert(pc.is_in(carried["item_id"], value_set=today["item_id"])),
                                    pc.is_in(carried["item_id"], value_set=catalog_ids)))
    return pa.concat_tables([today, others.cast(JUDGE_NEUTRAL.schema)]).sort_by("item_id")


def judge_stage(pairs: pa.Table, items: pa.Table, interactions: pa.Table | None, cfg: JudgeConfig,
                previous: JudgeTables | None = None, scorer: "PairScorer | None" = None,
                valid_events: pa.Table | None = None, min_rating: float | None = POSITIVE_MIN_RATING,
                shards: "ShardRunner | None" = None) -> tuple[JudgeTables, dict]:
    """Judge every mined pair and measure the judge; returns the stage's tables and a report.

    ``pairs``: (n, src_item, dst_item, source, ...); ``items``: the catalog; ``interactions``: the
    log the evaluation sets are drawn from (None skips the evaluation); ``valid_events``: the
    validation period's events, whose co-occurrence calibrates the ``calibrated`` keep rules
    (``judge.calibrate``; positives by ``min_rating``); ``previous``: the last
    published tables, whose judgments, evaluation scores and neutral passes are reused where the
    LLM, prompt and item text are the same. The new judged pairs and the new evaluation pairs run
    through the LLM together, in one batched pass (shared contexts, one neutral pass per distinct
    item not already known). ``shards``: where the LLM's shards run (``qarm_core.lm.sharded``;
    None: here).
    Report: ``pairs``, ``pairs.scored`` (new this run), ``pairs.cached`` (of which
    ``pairs.cached.other_source``: judged before under the other source only), ``llm.pairs`` (pairs the
    LLM ran this run: judged + evaluation, distinct), ``neutral.cached`` (items B whose neutral
    value came from ``previous``) / ``neutral.computed`` (neutral passes the LLM ran: one per
    distinct item text not known),
    ``score_s``, ``pairs_per_s`` (llm.pairs per second of that pass), per source
    ``<source>.pairs/.kept/.keep_rate/.rejection_rate`` and the calibration's
    ``<source>.valid.labelled/.related/.auc``, ``<source>.threshold``, ``reasoning.rows``, ``reasoning_s``, the evaluation's
    ``auc.<set>``, ``eval.pairs(.cached)``, ``eval_s`` and ``notes``.
    """
    from qarm_core.judge.judge import pair_components

    previous = previous or JudgeTables.empty()
    scorer = scorer or make_scorer(cfg, shards=shards)
    keyed = keyed_pairs(pairs, items, scorer.prompt.item_format)     # validated, hashed once for the run
    todo = pairs_to_score(previous.judgments, keyed, scorer.model_id, cfg.prompt_version)
    # of the cached pairs, those judged before under another source only (their score carries over)
    other_source = pairs_to_score(previous.judgments, keyed, scorer.model_id, cfg.prompt_version,
                                  key=CACHE_KEY).num_rows - todo.num_rows
    notes = {"model_id": scorer.model_id, "prompt_version": cfg.prompt_version} | _dtype_notes(scorer.backend)
    eval_pairs, why = (None, "skipped: no interactions given") if interactions is None else \
        draw_eval_pairs(interactions, items, cfg.eval)
    if eval_pairs is None:
        notes["eval"] = why if why.startswith("skipped") else f"skipped: {why}"
    plan = _plan_eval(eval_pairs, items, scorer, previous.judge_eval) if eval_pairs is not None else None
    # Every item that can be scored as B this run: its neutral pass is taken from the last run
    # where the LLM, the prompt and the item's text are unchanged.
    b_items = set(pairs["dst_item"].to_pylist()) | (set(eval_pairs["dst_item"].to_pylist()) if plan else set())
    texts, hashes, neutral_cached, neutral_known = _neutral_plan(items, b_items, scorer, previous.judge_neutral)
    passes_before = scorer.neutral_passes
    # One LLM pass over the new judged pairs and the evaluation pairs not in the cache.
    t0 = time.perf_counter()
    union = todo.select(["src_item", "dst_item"])
    if plan is not None:
        union = pa.concat_tables([union, plan.todo_pairs()])
    if union.num_rows:
        union = union.group_by(["src_item", "dst_item"], use_threads=False).aggregate([])
        pair_components(union, items, scorer, "pairs (new judged + evaluation)")
    score_s = time.perf_counter() - t0
    # Everything below reads what that pass computed.
    out = judge_pairs(keyed, items, cfg.model_copy(update={"reasoning": "none"}), previous.judgments, scorer)
    calibration: dict = {}
    if valid_events is not None:
        rules, calibration = calibrate_keep_rules(out, future_labels(out, valid_events, min_rating), cfg.keep)
        out = apply_keep_rules(out, rules)
    else:
        calibration = {"notes": {f"{s}.keep_rule": "imposed: keep_fraction (no validation events given)"
                                 for s in SOURCES if getattr(cfg.keep, s).mode == "calibrated"}}
    t1 = time.perf_counter()
    out = add_reasoning(out, items, scorer.backend, cfg)
    reasoning_s = time.perf_counter() - t1
    neutral = _neutral_table(texts, hashes, scorer, neutral_known, items["item_id"])
    report: dict = {"pairs": float(out.num_rows), "pairs.scored": float(todo.num_rows),
                    "pairs.cached": float(out.num_rows - todo.num_rows),
                    "pairs.cached.other_source": float(other_source), "llm.pairs": float(union.num_rows),
                    "neutral.cached": float(neutral_cached), "neutral.computed": float(scorer.neutral_passes - passes_before),
                    "score_s": score_s, "reasoning_s": reasoning_s,
                    "reasoning.rows": float(out.num_rows - out["reasoning"].null_count)}
    if union.num_rows:
        report["pairs_per_s"] = union.num_rows / max(score_s, 1e-9)
    source = np.asarray(out["source"].to_pylist(), dtype=object)
    keep = out["keep"].to_numpy(zero_copy_only=False)
    for s in sorted(set(source.tolist())):
        m = source == s
        report |= {f"{s}.pairs": float(m.sum()), f"{s}.kept": float(keep[m].sum()),
                   f"{s}.keep_rate": float(keep[m].mean()), f"{s}.rejection_rate": float(1 - keep[m].mean())}
    notes |= calibration.pop("notes", {})
    report |= calibration
    eval_table = JUDGE_EVAL.schema.empty_table()
    if plan is not None:
        t2 = time.perf_counter()
        aucs, eval_table = _finish_eval(plan, items, scorer)
        report |= aucs
        report["eval_s"] = time.perf_counter() - t2
    report["notes"] = notes
    return JudgeTables(out, eval_table, neutral), report


def qa_item_ids(judgments: pa.Table | None, items: pa.Table, mode: str) -> list[int]:
    """Which items get QA: ``"kept_pairs"``, the items of kept judged pairs (the ones training
    reads); ``"all"``, the whole catalog (``judgments`` unused, may be None). Sorted, distinct."""
    if mode == "all":
        return sorted(set(items["item_id"].to_pylist()))
    if mode != "kept_pairs":
        raise ValueError(f"unknown QA item selection {mode!r}")
    if judgments is None:
        raise ValueError("QA of the kept pairs' items needs the judge's verdicts")
    kept = judgments.filter(pc.fill_null(judgments["keep"], False))
    return sorted(set(kept["src_item"].to_pylist()) | set(kept["dst_item"].to_pylist()))


def qa_stage(items: pa.Table, cfg: QAConfig, item_ids: Iterable[int], previous: pa.Table | None = None,
             backend: "LMBackend | None" = None, shards: "ShardRunner | None" = None,
             defer: bool = False) -> tuple[pa.Table, dict]:
    """QA rows (``schemas.QA``) for ``item_ids``; items answered in ``previous`` by the same model
    and prompt are copied. ``defer``: the others are counted, not answered, and no weights are
    loaded (``QAConfig.when_model_reused``). Report: ``items``, ``items.generated``, ``questions``,
    ``items.deferred``, ``questions.deferred``, ``llm_answers_kept``, ``llm_answer_rate``,
    ``generate_s``, ``items_per_s``."""
    from qarm_core.judge.qa import QAStats, generate_qa, made_with
    from qarm_core.lm.backend import make_backend

    named_only = False
    if backend is None and defer and cfg.backend == "local":
        from qarm_core.lm.local import LocalLM

        backend, named_only = LocalLM(cfg.local, weights=False), True   # its model id only: no weights
    if backend is None:
        backend = make_backend(cfg.backend, cfg.local, cfg.http, shards, name="qa")
    if defer and (previous is None or not made_with(previous, backend.model_id, cfg.prompt_version).num_rows):
        # the published QA is another model's or prompt's: none of it stays valid, and a deferring
        # run would publish an empty table; answer now, as a run that trains would
        defer, why = False, "answered now: the published QA is another model's or prompt's"
        if named_only:
            backend = make_backend(cfg.backend, cfg.local, cfg.http, shards, name="qa")
    else:
        why = None
    ids = sorted({int(i) for i in item_ids})
    stats = QAStats()
    t0 = time.perf_counter()
    table = generate_qa(items, backend, cfg, previous=previous, item_ids=ids, stats=stats, defer=defer)
    seconds = time.perf_counter() - t0
    report = {"items": float(len(ids)), "items.generated": float(stats.items),
              "questions": float(stats.questions), "llm_answers_kept": float(stats.llm_answers_kept),
              "fallbacks": float(stats.fallbacks), "generate_s": seconds,
              "notes": {"model_id": backend.model_id, "prompt_version": cfg.prompt_version}
                        | ({} if defer else _dtype_notes(backend))}    # a deferring run ran no model
    if defer:
        report |= {"items.deferred": float(stats.deferred_items), "questions.deferred": float(stats.deferred_questions)}
    if why:
        report["notes"]["deferral"] = why
    if stats.questions:
        report["llm_answer_rate"] = stats.llm_answers_kept / stats.questions
    if stats.items:
        report["items_per_s"] = stats.items / max(seconds, 1e-9)
    return table, report
