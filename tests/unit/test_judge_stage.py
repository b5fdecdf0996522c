"""The judge and QA stages as the flow calls them: reports, cache reuse, evaluation, item selection."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from qarm_core.judge.config import JudgeConfig, JudgeEvalConfig, QAConfig
from qarm_core.lm.config import LocalModelConfig
from qarm_core.judge.judge import PairScorer
from qarm_core.judge.prompts import judge_prompt
from qarm_core.judge.stage import draw_eval_pairs, evaluate_judge, judge_stage, qa_item_ids, qa_stage
from qarm_core.schemas import JUDGE_EVAL, JUDGE_NEUTRAL, JUDGMENTS, QA
from qarm_core.synth import SynthSpec, iter_synthetic_interactions, iter_synthetic_items
from tests.support.tolerances import LOGPROB_ATOL

CFG = JudgeConfig(embed_weight=0.0, tag_weight=0.0, reasoning="sample", reasoning_sample=3,
                  reasoning_max_tokens=4, eval=JudgeEvalConfig(n_per_class=10, min_item_ratings=5))


@pytest.fixture(scope="module")
def backend(tiny_lm_path):
    from qarm_core.lm.local import LocalLM

    return LocalLM(LocalModelConfig(model_path=str(tiny_lm_path), dtype="float32", batch_size=8))


@pytest.fixture(scope="module")
def data():
    spec = SynthSpec(users=60, items=30, interactions=900, seed=3)
    items = pa.Table.from_batches(list(iter_synthetic_items(spec)))
    inter = pa.Table.from_batches(list(iter_synthetic_interactions(spec)))
    rng = np.random.default_rng(0)
    src = rng.integers(0, 30, 60)
    dst = (src + rng.integers(1, 30, 60)) % 30
    pairs = pa.table({"src_item": pa.array(src, pa.int64()), "dst_item": pa.array(dst, pa.int64()),
                      "score": pa.array(rng.random(60)), "source": ["swing"] * 40 + ["u2i"] * 20})
    pairs = pairs.group_by(["src_item", "dst_item", "source"]).aggregate([("score", "max")])
    return items, inter, pairs


def test_judge_stage_report_and_cache(backend, data):
    items, inter, pairs = data
    scorer = PairScorer(backend, judge_prompt(CFG.prompt_version))
    tables, rep = judge_stage(pairs, items, inter, CFG, scorer=scorer)
    out, ev = tables.judgments, tables.judge_eval
    assert out.schema == JUDGMENTS.schema and out.num_rows == pairs.num_rows
    assert ev.schema == JUDGE_EVAL.schema and ev.num_rows == rep["eval.pairs"] > 0
    assert rep["pairs"] == rep["pairs.scored"] == pairs.num_rows and rep["pairs.cached"] == 0
    # one LLM pass over the judged and the evaluation pairs: each distinct pair once
    distinct = set(zip(pairs["src_item"].to_pylist(), pairs["dst_item"].to_pylist())) | \
        set(zip(ev["src_item"].to_pylist(), ev["dst_item"].to_pylist()))
    assert rep["llm.pairs"] == len(distinct) and rep["pairs_per_s"] > 0
    assert rep["reasoning.rows"] == out.num_rows - out["reasoning"].null_count <= 3
    n_swing = pc.sum(pc.equal(pairs["source"], "swing")).as_py()
    assert rep["swing.pairs"] == n_swing and rep["swing.kept"] == np.ceil(0.9 * n_swing)
    assert rep["u2i.keep_rate"] == pytest.approx(np.ceil(0.3 * rep["u2i.pairs"]) / rep["u2i.pairs"])
    assert {"auc.cooc", "auc.genre"} <= rep.keys() and rep["eval.pairs.cached"] == 0
    assert "eval" not in rep["notes"] and rep["notes"]["prompt_version"] == CFG.prompt_version
    assert rep["notes"]["dtype"] == "float32" and rep["notes"]["dtype_reason"] == "set by local.dtype"
    assert rep["notes"]["rows"] == "packed, prefix read in place"        # a Llama-style model on a CPU

    # next day: two new pairs, and a swing pair mined by the two-tower too; the old ones come from
    # the cache with their scores and reasoning, the switched one with its score only
    sw = [(a, b) for a, b, s in zip(pairs["src_item"].to_pylist(), pairs["dst_item"].to_pylist(),
                                     pairs["source"].to_pylist()) if s == "swing"]
    both = set(zip(pairs["src_item"].to_pylist(), pairs["dst_item"].to_pylist(), pairs["source"].to_pylist()))
    a, b = next((a, b) for a, b in sw if (a, b, "u2i") not in both)
    extra = pa.table({"src_item": pa.array([0, 1, a], pa.int64()), "dst_item": pa.array([29, 28, b], pa.int64()),
                      "source": ["swing", "swing", "u2i"], "score_max": [1.0, 1.0, 1.0]})
    more = pa.concat_tables([pairs, extra.cast(pairs.schema)]).group_by(
        ["src_item", "dst_item", "source"]).aggregate([("score_max", "max")])
    new_pairs = more.num_rows - pairs.num_rows - 1                    # the switched pair is not new
    fresh = PairScorer(backend, judge_prompt(CFG.prompt_version))    # a new process: nothing in memory
    tables2, rep2 = judge_stage(more, items, inter, CFG, previous=tables, scorer=fresh)
    out2, ev2 = tables2.judgments, tables2.judge_eval
    # the neutral passes of yesterday's items were not run again: only the new items' were
    assert rep["neutral.cached"] == 0 and rep["neutral.computed"] == tables.judge_neutral.num_rows > 0
    new_b = set(more["dst_item"].to_pylist()) - set(tables.judge_neutral["item_id"].to_pylist())
    assert rep2["neutral.computed"] == len(new_b) and rep2["neutral.cached"] == tables.judge_neutral.num_rows
    assert rep2["pairs.scored"] == new_pairs and rep2["pairs.cached"] == pairs.num_rows + 1
    assert rep2["pairs.cached.other_source"] == 1 and rep["pairs.cached.other_source"] == 0
    switched = {(r["source"]): r["score"] for r in out2.to_pylist() if (r["src_item"], r["dst_item"]) == (a, b)}
    assert switched["u2i"] == switched["swing"]
    # the evaluation came from the published scores: the LLM ran on the new pairs only
    assert rep2["eval.pairs.cached"] == rep2["eval.pairs"] and rep2["llm.pairs"] == new_pairs
    assert {k: rep2[k] for k in ("auc.cooc", "auc.genre")} == {k: rep[k] for k in ("auc.cooc", "auc.genre")}
    assert ev2.to_pylist() == ev.to_pylist()
    key = ["src_item", "dst_item", "source"]
    j = out.select(key + ["score", "reasoning"]).join(out2.select(key + ["score", "reasoning"]),
                                                       keys=key, right_suffix="_2")
    assert j["score"].to_pylist() == j["score_2"].to_pylist()
    # no interactions: the evaluation is skipped, and says so
    tables3, rep3 = judge_stage(more, items, None, CFG, previous=tables2, scorer=fresh)
    assert rep3["notes"]["eval"].startswith("skipped") and "auc.cooc" not in rep3
    assert tables3.judge_eval.num_rows == 0 and tables3.judge_neutral.schema == JUDGE_NEUTRAL.schema


def test_neutral_counts_passes_once_per_text_and_cached_items(backend, data):
    """Items B that share one text share one neutral pass: ``neutral.computed`` counts the LLM's
    passes (distinct texts), ``neutral.cached`` the items whose value the last run had."""
    items, _, _ = data
    rows = items.to_pylist()                         # items 1 and 2 become copies of item 0 but for their ids
    rows[1:3] = [{**rows[0], "item_id": i} for i in (1, 2)]
    twins = pa.Table.from_pylist(rows, schema=items.schema)
    pairs = pa.table({"src_item": pa.array([5, 6, 7, 8], pa.int64()), "dst_item": pa.array([0, 1, 2, 9], pa.int64()),
                      "source": ["swing"] * 4})
    scorer = PairScorer(backend, judge_prompt(CFG.prompt_version))
    tables, rep = judge_stage(pairs, twins, None, CFG, scorer=scorer)
    assert rep["neutral.computed"] == 2 == scorer.neutral_passes and rep["neutral.cached"] == 0
    assert tables.judge_neutral.num_rows == 4                        # one row per item B
    fresh = PairScorer(backend, judge_prompt(CFG.prompt_version))
    _, rep2 = judge_stage(pairs, twins, None, CFG, previous=tables, scorer=fresh)
    assert rep2["neutral.computed"] == 0 == fresh.neutral_passes and rep2["neutral.cached"] == 4


def test_an_item_absent_for_a_day_keeps_its_neutral_pass_until_it_is_b_again(backend, data):
    """The neutral table carries the last run's rows for items that are not B today (same LLM and
    prompt): an item B on day 1, not on day 2 and B again on day 3 is not passed again. Rows of
    items gone from the catalog are dropped; one row per item."""
    items, _, _ = data

    def day(dst: list[int], catalog: pa.Table = items, previous=None):
        pairs = pa.table({"src_item": pa.array([5] * len(dst), pa.int64()), "dst_item": pa.array(dst, pa.int64()),
                          "source": ["swing"] * len(dst)})
        return judge_stage(pairs, catalog, None, CFG, previous=previous,
                           scorer=PairScorer(backend, judge_prompt(CFG.prompt_version)))

    t1, r1 = day([0, 9])
    t2, r2 = day([3], previous=t1)
    assert (r2["neutral.computed"], r2["neutral.cached"]) == (1, 0)
    assert sorted(t2.judge_neutral["item_id"].to_pylist()) == [0, 3, 9]
    t3, r3 = day([0, 9], previous=t2)
    assert (r3["neutral.computed"], r3["neutral.cached"]) == (0, 2)
    # the values carried are the ones computed: a day 3 judged from scratch scores the same
    scratch, _ = day([0, 9])
    assert t3.judgments["score"].to_pylist() == pytest.approx(scratch.judgments["score"].to_pylist(), abs=LOGPROB_ATOL)
    # item 9 leaves the catalog: its row goes with it
    fewer = items.filter(pc.not_equal(items["item_id"], 9))
    t4, _ = day([3], catalog=fewer, previous=t3)
    assert sorted(t4.judge_neutral["item_id"].to_pylist()) == [0, 3]
    # another prompt's rows are not carried
    other = CFG.model_copy(update={"prompt_version": "pmi-fs-v1" if CFG.prompt_version != "pmi-fs-v1" else "pmi-fs-v2"})
    pairs = pa.table({"src_item": pa.array([5], pa.int64()), "dst_item": pa.array([3], pa.int64()), "source": ["swing"]})
    t5, _ = judge_stage(pairs, items, None, other, previous=t3,
                        scorer=PairScorer(backend, judge_prompt(other.prompt_version)))
    assert t5.judge_neutral["item_id"].to_pylist() == [3]


@pytest.mark.parametrize("version", ["pmi-fs-v2", "pmi-fs-v1"])
def test_an_item_whose_tags_change_is_judged_again_and_its_neutral_pass_follows_the_scored_text(
        backend, data, version):
    """``pmi-fs-v2`` scores B without its tags: new tags on an item B re-judge its pairs (the pair
    key hashes every field the judge reads) but reuse its neutral pass, whose text did not change;
    ``pmi-fs-v1`` scores the tags, so the neutral pass runs again. Scores equal a fresh judgment."""
    items, _, _ = data
    cfg = CFG.model_copy(update={"prompt_version": version, "reasoning": "none"})
    pairs = pa.table({"src_item": pa.array([5, 6, 7], pa.int64()), "dst_item": pa.array([0, 0, 9], pa.int64()),
                      "source": ["swing"] * 3})
    tables, rep = judge_stage(pairs, items, None, cfg, scorer=PairScorer(backend, judge_prompt(version)))
    assert rep["neutral.computed"] == 2
    tags = [["Retagged"] if i == 0 else t for i, t in zip(items["item_id"].to_pylist(), items["tags"].to_pylist())]
    retagged = items.set_column(items.column_names.index("tags"), "tags", pa.array(tags, items.schema.field("tags").type))
    again, rep2 = judge_stage(pairs, retagged, None, cfg, previous=tables,
                              scorer=PairScorer(backend, judge_prompt(version)))
    assert rep2["pairs.scored"] == 2 and rep2["pairs.cached"] == 1
    assert (rep2["neutral.cached"], rep2["neutral.computed"]) == ((2, 0) if version == "pmi-fs-v2" else (1, 1))
    scratch, _ = judge_stage(pairs, retagged, None, cfg, scorer=PairScorer(backend, judge_prompt(version)))
    assert again.judgments["score"].to_pylist() == pytest.approx(scratch.judgments["score"].to_pylist(), abs=LOGPROB_ATOL)
    before = dict(zip(tables.judgments["src_item"].to_pylist(), tables.judgments["score"].to_pylist()))
    after = dict(zip(again.judgments["src_item"].to_pylist(), again.judgments["score"].to_pylist()))
    # B's scored text is unchanged under pmi-fs-v2; under pmi-fs-v1 it changed, and a stale score would be
    # off by far more than the tolerance
    diff = abs(after[5] - before[5])
    assert diff <= LOGPROB_ATOL if version == "pmi-fs-v2" else diff > 100 * LOGPROB_ATOL


def test_evaluation_cache_follows_item_text(backend, data):
    """An evaluation pair whose item text changed is scored again; the others are not."""
    items, inter, _ = data
    eval_pairs, why = draw_eval_pairs(inter, items, CFG.eval)
    assert why is None and eval_pairs.num_rows > 0
    scorer = PairScorer(backend, judge_prompt(CFG.prompt_version))
    aucs, ev = evaluate_judge(eval_pairs, items, scorer)
    assert aucs["eval.pairs.cached"] == 0
    again, ev_again = evaluate_judge(eval_pairs, items, PairScorer(backend, judge_prompt(CFG.prompt_version)), ev)
    assert again == {**aucs, "eval.pairs.cached": aucs["eval.pairs"]} and ev_again.to_pylist() == ev.to_pylist()
    renamed = eval_pairs["src_item"][0].as_py()
    titles = [f"{t} (director's cut)" if i == renamed else t
              for i, t in zip(items["item_id"].to_pylist(), items["title"].to_pylist())]
    items2 = items.set_column(items.column_names.index("title"), "title", pa.array(titles, pa.string()))
    changed = sum(renamed in (s, d) for s, d in zip(eval_pairs["src_item"].to_pylist(), eval_pairs["dst_item"].to_pylist()))
    after, _ = evaluate_judge(eval_pairs, items2, PairScorer(backend, judge_prompt(CFG.prompt_version)), ev)
    assert after["eval.pairs.cached"] == aucs["eval.pairs"] - changed


def test_evaluation_skipped_with_a_reason(data):
    items, inter, _ = data
    no_ratings = inter.set_column(inter.column_names.index("rating"), "rating",
                                  pa.nulls(inter.num_rows, inter.schema.field("rating").type))
    assert draw_eval_pairs(no_ratings, items, CFG.eval) == (
        None, "the interactions carry no ratings (the evaluation sets are drawn from ratings)")
    pairs, why = draw_eval_pairs(inter, items, JudgeEvalConfig(min_item_ratings=10_000))
    assert pairs is None and "too few for evaluation" in why
    assert draw_eval_pairs(inter, items, JudgeEvalConfig(enabled=False))[1] == "judge.eval.enabled is false"
    # a user sample bounds the cost on big logs; too few users then leaves too few rated items
    few, _ = draw_eval_pairs(inter, items, JudgeEvalConfig(max_users=10, min_item_ratings=5))
    full, _ = draw_eval_pairs(inter, items, JudgeEvalConfig(min_item_ratings=5, n_per_class=10))
    assert few is None or few.to_pylist() != full.to_pylist()


def test_qa_items_and_stage(backend, data):
    items, _, _ = data
    j = pa.table({"src_item": pa.array([1, 2, 3], pa.int64()), "dst_item": pa.array([4, 5, 6], pa.int64()),
                  "keep": [True, False, None]})
    assert qa_item_ids(j, items, "kept_pairs") == [1, 4]
    assert qa_item_ids(j, items, "all") == qa_item_ids(None, items, "all") == list(range(30))
    with pytest.raises(ValueError, match="unknown QA item selection"):
        qa_item_ids(j, items, "some")
    with pytest.raises(ValueError, match="needs the judge's verdicts"):
        qa_item_ids(None, items, "kept_pairs")
    assert QAConfig().needs_judgments and not QAConfig(items="all").needs_judgments
    cfg = QAConfig(k=2, max_new_tokens=6)
    qa, rep = qa_stage(items, cfg, [1, 4], backend=backend)
    assert qa.schema == QA.schema and set(qa["item_id"].to_pylist()) == {1, 4} and qa.num_rows == 4
    assert rep["items.generated"] == 2 and rep["questions"] == 4 and rep["items_per_s"] > 0
    assert rep["llm_answers_kept"] + rep["fallbacks"] == 4
    qa2, rep2 = qa_stage(items, cfg, [1, 4, 7], previous=qa, backend=backend)
    assert rep2["items.generated"] == 1 and qa2.num_rows == 6
    assert qa2.filter(pc.is_in(qa2["item_id"], pa.array([1, 4], pa.int64()))).to_pylist() == qa.to_pylist()


def test_qa_deferred_while_the_model_is_reused(backend, tiny_lm_path, data, monkeypatch):
    """``defer`` (a run that trains nothing): the items lacking QA are counted, not answered, and no
    weights are loaded; the rows still valid are published as they were, those of an item whose
    fields changed are dropped; a run that does not defer then answers every item still lacking QA."""
    items, _, _ = data
    cfg = QAConfig(k=2, max_new_tokens=6, local=LocalModelConfig(model_path=str(tiny_lm_path), dtype="float32"))
    qa, _ = qa_stage(items, cfg, [1, 4], backend=backend)
    # item 4's title changes: its rows are no longer valid
    titles = items["title"].to_pylist()
    titles[4] = titles[4] + " (director's cut)"
    changed = items.set_column(items.column_names.index("title"), "title", pa.array(titles))
    from qarm_core.lm import local

    monkeypatch.setattr(local.LocalLM, "generate", lambda *a, **k: pytest.fail("a deferring run generated"))
    loads = []
    real_init = local.LocalLM.__init__
    monkeypatch.setattr(local.LocalLM, "__init__", lambda self, *a, **k: loads.append(k.get("weights", True))
                        or real_init(self, *a, **k))
    deferred, rep = qa_stage(changed, cfg, [1, 4, 7], previous=qa, defer=True)
    assert loads == [False]                                       # the model's name only
    assert deferred.to_pylist() == qa.filter(pc.equal(qa["item_id"], 1)).to_pylist()
    assert rep["items.generated"] == rep["questions"] == 0 and "llm_answer_rate" not in rep
    assert rep["items.deferred"] == 2 and rep["questions.deferred"] == 4 and "dtype" not in rep["notes"]
    assert rep["notes"]["model_id"] == backend.model_id
    monkeypatch.undo()
    # the next run that trains: the deferred items are answered, item 1's rows copied
    full, rep2 = qa_stage(changed, cfg, [1, 4, 7], previous=deferred, backend=backend)
    assert rep2["items.generated"] == 2 and "items.deferred" not in rep2
    assert sorted(set(full["item_id"].to_pylist())) == [1, 4, 7] and full.num_rows == 6
    # nothing to defer: the same rows, zero deferred
    again, rep3 = qa_stage(changed, cfg, [1, 4, 7], previous=full, backend=backend, defer=True)
    assert again.to_pylist() == full.to_pylist() and rep3["items.deferred"] == 0


def test_qa_not_deferred_when_the_published_qa_is_another_prompts(backend, data):
    """A deferring run whose published QA was made with another prompt (or model) would publish no
    row at all: it answers now, and says why."""
    items, _, _ = data
    cfg = QAConfig(k=2, max_new_tokens=6)
    old, _ = qa_stage(items, QAConfig(k=2, max_new_tokens=6, prompt_version="qa-v1"), [1, 4], backend=backend)
    qa, rep = qa_stage(items, cfg, [1, 4], previous=old, backend=backend, defer=True)
    assert rep["items.generated"] == 2 and "items.deferred" not in rep and qa.num_rows == 4
    assert set(qa["prompt_version"].to_pylist()) == {"qa-v2"} and "another model's or prompt's" in rep["notes"]["deferral"]
