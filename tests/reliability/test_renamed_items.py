"""Nothing stale published: items that keep their ids but change their titles between two refreshes are
judged and asked again, and what the second refresh publishes carries only their new text (the issue's
drill: stale judge scores and QA "In which year was Wireless Headphones #1 released?" for an item
titled "Movie number 1" were published; here synthetic products are renamed "Movie number <id>").
Two real `qarm refresh` processes on the tiny config; the second reads the first's published log, with
the renamed items, as its input files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qarm_core.storage import Storage, read_dataset
from tests.support.paths import TINY
from tests.support.refresh import Refresh, harness_api_url

pytestmark = pytest.mark.slow


def _stage_metrics(runs: list[dict], parent_run_id: str, name: str) -> dict:
    [run] = [r for r in runs if r["name"] == name and r["tags"].get("mlflow.parentRunId") == parent_run_id]
    return run["metrics"]


def test_a_refresh_after_items_were_renamed_publishes_no_judgment_or_qa_of_their_old_text(prefect_harness,
                                                                                            tmp_path: Path):
    """A first refresh publishes; 8 of its 40 items are renamed (same ids) in the input of a second, which
    publishes: its judgments and QA hash the new texts (as the judge and QA hash them), the renamed items'
    pairs and QA were made again (the judge and QA stages' MLflow counts), the rest reused."""
    from qarm_core.config import load_config
    from qarm_core.judge.judge import pair_text_hashes
    from qarm_core.judge.prompts import judge_prompt
    from qarm_core.judge.qa import item_field_hash
    from qarm_core.schemas import JUDGMENTS
    from tasks import tracking

    home = tmp_path / "home"
    first = Refresh(home, harness_api_url())
    assert first.finish() == 0, first.output[-3000:]
    st = Storage(home)
    s1 = st.current()
    items0 = read_dataset(s1.record("items")).sort_by("item_id")
    ids = items0["item_id"].to_pylist()
    renamed = set(ids[::5])                                       # 8 of the 40 items, ids unchanged
    titles = [f"Movie number {i}" if i in renamed else t for i, t in zip(ids, items0["title"].to_pylist())]
    assert all(t != old for i, t, old in zip(ids, titles, items0["title"].to_pylist()) if i in renamed)
    items1 = items0.set_column(items0.column_names.index("title"), "title", pa.array(titles, pa.string()))
    inputs = {"items": tmp_path / "items.parquet", "interactions": tmp_path / "interactions.parquet"}
    pq.write_table(items1, inputs["items"])
    pq.write_table(read_dataset(s1.record("interactions")), inputs["interactions"])
    # renaming a fifth of the catalog moves those items' embeddings and so their SIDs (35% churn seen):
    # the daily churn gate (5%) would rightly refuse to publish, and this drill is about what is published
    sets = {"ingest.source": "files", "gates.codes.max_daily_churn": 1.0,
            **{f"ingest.files.{name}": path for name, path in inputs.items()}}
    second = Refresh(home, harness_api_url(), [a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert second.finish() == 0, second.output[-3000:]
    s2 = st.current()
    assert s2.snapshot_id != s1.snapshot_id and s2.manifest["meta"]["parent_snapshot"] == s1.snapshot_id
    published_items = read_dataset(s2.record("items")).sort_by("item_id")
    assert published_items["title"].to_pylist() == titles

    cfg = load_config(TINY, {"home": str(home)}).resolved()
    runs = tracking.runs_of(cfg)
    parent_run = s2.manifest["meta"]["mlflow_run_id"]
    fmt = judge_prompt(cfg.judge.prompt_version).item_format

    # judgments: every published row hashes the text as published now; a renamed item's pairs were
    # judged again (their old hash is gone), the others' scores reused from the first snapshot (their
    # keep verdicts are not: the keep rules are calibrated again on each run's scores)
    key = lambda r: tuple(r[c] for c in JUDGMENTS.key)                                    # noqa: E731
    j1 = {key(r): r for r in read_dataset(s1.record("judgments")).to_pylist()}
    j2 = read_dataset(s2.record("judgments"))
    assert j2["text_hash"].to_pylist() == pair_text_hashes(j2, items1, fmt)
    old_hashes = pair_text_hashes(j2, items0, fmt)
    rows = j2.to_pylist()
    touched = [r["src_item"] in renamed or r["dst_item"] in renamed for r in rows]
    assert 0 < sum(touched) < len(rows), (sum(touched), len(rows))
    for r, t, old in zip(rows, touched, old_hashes):
        if t:
            assert r["text_hash"] != old, f"a stale judgment of a renamed item was published: {r}"
        elif key(r) in j1:
            assert (r["text_hash"], r["score"]) == (j1[key(r)]["text_hash"], j1[key(r)]["score"])
    # untouched pairs new under their source; one judged in the first snapshot under the other
    # source (same texts) takes that score without the LLM
    scored_before = {(r["src_item"], r["dst_item"], r["text_hash"]) for r in j1.values()}
    new_elsewhere = sum(1 for r, t in zip(rows, touched) if not t and key(r) not in j1
                        and (r["src_item"], r["dst_item"], r["text_hash"]) not in scored_before)
    assert _stage_metrics(runs, parent_run, "judge")["pairs.scored"] == sum(touched) + new_elsewhere

    # QA: every published row made from the item's fields as published now; a renamed item's rows
    # were written again and quote none of its old title
    q1_ids = set(read_dataset(s1.record("qa"))["item_id"].to_pylist())
    q2 = read_dataset(s2.record("qa"))
    now = {r["item_id"]: r for r in items1.to_pylist()}
    before = {r["item_id"]: r for r in items0.to_pylist()}
    assert q2["text_hash"].to_pylist() == [item_field_hash(now[i]) for i in q2["item_id"].to_pylist()]
    renamed_qa = [r for r in q2.to_pylist() if r["item_id"] in renamed]
    assert renamed_qa, "no renamed item has QA: the drill checks nothing"
    for r in renamed_qa:
        assert r["text_hash"] != item_field_hash(before[r["item_id"]])
        assert before[r["item_id"]]["title"] not in r["question"] + r["answer"], r
    q2_ids = set(q2["item_id"].to_pylist())
    asked = (q2_ids & renamed) | (q2_ids - q1_ids)
    assert _stage_metrics(runs, parent_run, "qa")["items.generated"] == len(asked)
