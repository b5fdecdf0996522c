"""Tasks on the real Prefect engine and a real MLflow sqlite store in tmp."""

import numpy as np
import pyarrow as pa
import pytest

from qarm_core.errors import DataError, GateError
from qarm_core.storage import Storage, read_dataset
from tasks import tracking
from tasks.gate import gate
from tasks.ingest import ingest
from tasks.publish import publish


@pytest.fixture
def parent(tiny_cfg):
    with tracking.flow_run(tiny_cfg, "test-flow") as run_id:
        yield run_id


def _stage_runs(cfg, name):
    return [r for r in tracking.runs_of(cfg) if r["name"] == name]


def test_ingest_writes_then_reuses(prefect_harness, tiny_cfg, parent):
    recs = ingest(tiny_cfg, parent)
    assert recs["interactions"].rows == 800 and recs["items"].rows == 40
    again = ingest(tiny_cfg, parent)
    assert again == recs
    runs = _stage_runs(tiny_cfg, "ingest")
    assert sorted(r["metrics"]["reused"] for r in runs) == [0.0, 1.0]
    assert all(r["tags"]["mlflow.parentRunId"] == parent and r["status"] == "FINISHED" for r in runs)
    assert read_dataset(recs["items"]).num_rows == 40


def test_ingest_bad_file_is_not_retried_and_names_dataset(prefect_harness, tiny_cfg, parent, tmp_path):
    (tmp_path / "i.csv").write_text("user_id,item_id\n1,2\n")
    (tmp_path / "t.csv").write_text("item_id,title\n2,x\n")
    cfg = tiny_cfg.model_copy(update={"ingest": tiny_cfg.ingest.model_copy(update={
        "source": "files", "files": tiny_cfg.ingest.files.model_copy(update={
            "interactions": str(tmp_path / "i.csv"), "items": str(tmp_path / "t.csv")})})})
    with pytest.raises(DataError, match=r"\[stage=ingest, dataset=interactions\] missing required"):
        ingest.with_options(retries=3, retry_delay_seconds=0)(cfg, parent)
    [run] = _stage_runs(cfg, "ingest")  # one attempt: bad input is not retried
    assert run["status"] == "FAILED" and "missing required" in run["tags"]["qarm.error"]


def test_gate_logs_and_raises(prefect_harness, tiny_cfg, parent):
    recs = ingest(tiny_cfg, parent)
    ok = gate(tiny_cfg, parent, "ingest", recs["interactions"], catalog=recs["items"])
    assert ok.success
    strict = tiny_cfg.model_copy(update={"gates": tiny_cfg.gates.model_copy(update={
        "items": tiny_cfg.gates.items.model_copy(update={"min_rows": 1000})})})
    with pytest.raises(GateError, match="expect_table_row_count_to_be_between"):
        gate(strict, parent, "ingest", recs["items"])
    failed = [r for r in _stage_runs(tiny_cfg, "gate-ingest-items")]
    assert failed[0]["status"] == "FAILED" and failed[0]["metrics"]["gate.items.success"] == 0.0


def test_item_text_has_a_length_gate_and_can_be_truncated_while_reading(prefect_harness, tiny_cfg, parent, tmp_path):
    (tmp_path / "i.csv").write_text("user_id,item_id,ts,rating\n" + "".join(f"{u},{u % 3},{u},4\n" for u in range(30)))
    (tmp_path / "t.csv").write_text("item_id,title,description\n0,a,short\n1,b,\"" + "x" * 20_000 + "\"\n2,c,\n"
                                    + "".join(f"{i},t{i},d\n" for i in range(3, 12)))
    files = {"source": "files", "files": tiny_cfg.ingest.files.model_copy(update={
        "interactions": str(tmp_path / "i.csv"), "items": str(tmp_path / "t.csv")})}
    cfg = tiny_cfg.model_copy(update={"ingest": tiny_cfg.ingest.model_copy(update=files)})
    recs = ingest(cfg, parent)
    with pytest.raises(GateError, match=r"\[stage=ingest, dataset=items\][\s\S]*value_lengths_to_be_between\(column='description'"):
        gate(cfg, parent, "ingest", recs["items"])
    cut = tiny_cfg.model_copy(update={"ingest": tiny_cfg.ingest.model_copy(update={**files,
                                                                                  "truncate_description_chars": 5_000})})
    recs = ingest(cut, parent)
    assert gate(cut, parent, "ingest", recs["items"]).success
    desc = read_dataset(recs["items"])["description"].to_pylist()
    assert [len(d or "") for d in desc[:3]] == [5, 5_000, 0]


def test_publish_task(prefect_harness, tiny_cfg, parent):
    recs = ingest(tiny_cfg, parent)
    snap = publish(tiny_cfg, parent, recs)
    st = Storage(tiny_cfg.home)
    assert st.current().snapshot_id == snap.snapshot_id
    assert snap.manifest["meta"]["mlflow_run_id"] == parent
    assert isinstance(read_dataset(st.current().record("interactions")), pa.Table)
    [run] = _stage_runs(tiny_cfg, "publish")
    assert run["params"]["snapshot_id"] == snap.snapshot_id


def _embeddings_record(tmp_path, ids, dim=8, seed=0, noise=0.0):
    from qarm_core.quantize.io import embeddings_batch
    from qarm_core.schemas import embeddings_schema
    from qarm_core.storage import write_parquet_dataset

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, dim))
    x = centers[np.arange(len(ids)) % 6] + 0.3 * rng.normal(size=(len(ids), dim))
    x = x + noise * np.random.default_rng(seed + 1).normal(size=x.shape)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return write_parquet_dataset(tmp_path / f"emb{seed}_{noise}", iter([embeddings_batch(np.asarray(ids), x, "test")]),
                                 embeddings_schema(dim))


def test_quantize_refits_then_warm_starts_from_the_published_codebook(prefect_harness, tiny_cfg, parent, tmp_path):
    from tasks.quantize import quantize

    ids = list(range(40))
    emb = _embeddings_record(tmp_path, ids)
    first = quantize(tiny_cfg, parent, emb)
    assert first["codes"].rows == 40 and "codebook.json" in first["codebook"].files
    gate(tiny_cfg, parent, "quantize", first["codes"], expect={"code_sizes": (4, 4, 9)})
    Storage(tiny_cfg.home).publish(first)
    # the next day, slightly moved embeddings: warm start from the published codebook, little churn
    moved = _embeddings_record(tmp_path, ids, noise=0.01)
    second = quantize(tiny_cfg, parent, moved)
    runs = {r["tags"]["qarm.quantize.previous"]: r for r in _stage_runs(tiny_cfg, "quantize")}
    assert runs["none"]["tags"]["qarm.quantize.how"] == "refit: no published codebook"
    [warm] = [r for k, r in runs.items() if k != "none"]
    assert warm["tags"]["qarm.quantize.how"] == "warm_start" and warm["metrics"]["churn"] <= 0.2
    codes = read_dataset(second["codes"])
    assert codes.num_rows == 40
    raw = np.stack([codes[c].to_numpy() for c in ("c1", "c2", "c3_raw")], axis=1)
    _, inv, counts = np.unique(raw, axis=0, return_inverse=True, return_counts=True)
    assert warm["metrics"]["raw.collision_rate"] == pytest.approx(float((counts[inv.ravel()] > 1).mean()))
    # pinned to the snapshot a refresh started from (here: none yet), a stage reads no codebook
    # whatever CURRENT names by the time it runs
    quantize(tiny_cfg, parent, moved, None)
    hows = [r["tags"]["qarm.quantize.how"] for r in _stage_runs(tiny_cfg, "quantize")]
    assert hows.count("refit: no published codebook") == 2 and hows.count("warm_start") == 1


def test_quantize_reprojects_a_new_models_vectors_onto_the_published_codebook(prefect_harness, tiny_cfg, parent,
                                                                             tmp_path):
    """The weekly retrain's quantize with ``quantize.lineage: reproject``: embeddings of another model
    than the published codebook's. The task hands the stage the published embeddings, the new vectors
    are mapped onto their space, and the codebook keeps the map; the next day's run on that model
    applies it (warm start, no churn)."""
    from qarm_core.quantize.io import embeddings_batch
    from qarm_core.quantize.quantizer import load_codebook
    from qarm_core.quantize.stage import REPROJECTED
    from qarm_core.schemas import embeddings_schema
    from qarm_core.storage import write_parquet_dataset
    from tasks.quantize import quantize

    cfg = tiny_cfg.model_copy(update={"quantize": tiny_cfg.quantize.model_copy(update={"lineage": "reproject"})})
    ids = np.arange(60)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8))[ids % 6] + 0.3 * rng.normal(size=(60, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x @ (np.eye(8) + 0.3 * rng.normal(size=(8, 8)))          # another model: a linear change of space
    y /= np.linalg.norm(y, axis=1, keepdims=True)

    def record(name: str, v: np.ndarray, version: str):
        return write_parquet_dataset(tmp_path / name, iter([embeddings_batch(ids, v, version)]), embeddings_schema(8))

    emb_a = record("a", x, "model-A")
    first = quantize(cfg, parent, emb_a)
    Storage(cfg.home).publish({**first, "embeddings": emb_a})
    emb_b = record("b", y, "model-B")
    second = quantize(cfg, parent, emb_b)
    [run] = [r for r in _stage_runs(cfg, "quantize") if r["tags"]["qarm.codebook.lineage"] == "model-A -> model-B"]
    assert run["tags"]["qarm.quantize.how"].endswith(REPROJECTED)
    assert run["tags"]["qarm.quantize.previous"].endswith("(the new vectors re-projected onto it, then refitted)")
    assert run["metrics"]["lineage.reproject_items"] == 60 and "lineage.prefix_churn" in run["metrics"]
    book = load_codebook(second["codebook"].path)
    assert book.model_version == "model-B" and book.input_map is not None
    Storage(cfg.home).publish({**second, "embeddings": emb_b})
    quantize(cfg, parent, emb_b)                             # the next daily run, same model
    [daily] = [r for r in _stage_runs(cfg, "quantize") if r["tags"]["qarm.codebook.lineage"] == "model-B -> model-B"]
    assert daily["tags"]["qarm.quantize.how"] == "warm_start" and daily["metrics"]["churn"] == 0.0


def test_a_stop_noticed_after_a_run_failed_is_named_on_it(tiny_cfg):
    """A signal turned into another error by an extension's C code (an ImportError without the
    signal in its chain): the run records that error; once the command learns it was stopped,
    ``name_the_stop`` leads the run's error with the signal, once."""
    import pytest

    with pytest.raises(ImportError):
        with tracking.flow_run(tiny_cfg, "stop-flow") as run_id:
            with tracking.stage_run(tiny_cfg, run_id, "mine"):
                raise ImportError("numba._devicearray failed to import")
    runs = [r for r in tracking.runs_of(tiny_cfg) if r["name"] in ("stop-flow", "mine")]
    assert {r["tags"]["qarm.error"] for r in runs} == {"ImportError: numba._devicearray failed to import"}
    assert tracking.name_the_stop("SIGTERM") == 2
    assert tracking.name_the_stop("SIGTERM") == 0                    # once
    runs = [r for r in tracking.runs_of(tiny_cfg) if r["name"] in ("stop-flow", "mine")]
    assert {r["tags"]["qarm.error"] for r in runs} == \
        {"stopped by SIGTERM: ImportError: numba._devicearray failed to import"}
    assert {r["status"] for r in runs} == {"FAILED"}


def test_mine_keeps_published_neighbours_and_reuses_its_candidates(prefect_harness, tiny_cfg, parent, tmp_path):
    """With ``mine.swing.keep_published_depth`` the published pairs are an input of the mine stage:
    a grown log keeps published neighbours that still rank within the depth, and a rerun against
    its own published pairs mines nothing again (the candidates are reused) and writes the same pairs."""
    from qarm_core.schemas import INTERACTIONS
    from qarm_core.storage import write_parquet_dataset
    from qarm_core.synth import GrowthSpec, SynthSpec, iter_growth_interactions, iter_synthetic_interactions
    from tasks.mine import mine

    cfg = tiny_cfg.model_copy(update={"mine": tiny_cfg.mine.model_copy(update={
        "sources": ["swing"], "swing": tiny_cfg.mine.swing.model_copy(update={"top_k": 5, "keep_published_depth": 2.0})})})
    items = ingest(cfg, parent)["items"]
    spec = SynthSpec(users=300, items=400, interactions=12_000, seed=1)
    day0 = list(iter_synthetic_interactions(spec))
    grown = day0 + list(iter_growth_interactions(GrowthSpec(spec, day=1, new_items=4, new_interactions=1_200)))
    ev0, ev1 = (write_parquet_dataset(tmp_path / name, iter(b), INTERACTIONS) for name, b in (("d0", day0), ("d1", grown)))

    st = Storage(cfg.home)
    first = mine(cfg, parent, ev0, items)["pairs"]
    st.publish({"pairs": first})
    second = mine(cfg, parent, ev1, items)["pairs"]
    st.publish({"pairs": second})
    third = mine(cfg, parent, ev1, items)["pairs"]
    assert third.fingerprint == second.fingerprint != first.fingerprint
    m = [r["metrics"] for r in reversed(_stage_runs(cfg, "mine"))]           # newest first: reversed
    assert [x["reused"] for x in m] == [0.0, 0.0, 0.0]             # the published pairs changed each time
    assert [x["candidates_reused"] for x in m] == [0.0, 0.0, 1.0]  # the log did not, the third time
    assert "swing.kept_published" not in m[0] and m[1]["swing.kept_published"] > 0 and m[1]["swing.new"] > 0
    assert m[2]["swing.new"] == 0 and m[2]["swing.kept_published"] == m[1]["swing.kept_published"]
    assert m[1]["swing.new"] == len({*zip(*(read_dataset(second)[c].to_pylist() for c in ("src_item", "dst_item")))}
                                    - {*zip(*(read_dataset(first)[c].to_pylist() for c in ("src_item", "dst_item")))})


def test_mine_reuses_the_published_towers_and_trains_when_they_are_of_another_format(prefect_harness, tiny_cfg, parent):
    """``mine.u2i.reuse_model``: the mine stage writes its towers (``two_tower``); once published, the
    next run mines with them untrained (the towers' fingerprint is an input: a new output, the same
    towers); towers recorded in another format are not read: the stage runs as without published
    towers (here the first run's output, reused) instead of failing."""
    import dataclasses

    from tasks.mine import TOWERS, mine

    cfg = tiny_cfg.model_copy(update={"mine": tiny_cfg.mine.model_copy(update={
        "sources": ["u2i"], "u2i": tiny_cfg.mine.u2i.model_copy(update={"reuse_model": True})})})
    recs = ingest(cfg, parent)
    st = Storage(cfg.home)
    first = mine(cfg, parent, recs["interactions"], recs["items"])
    assert set(first) == {"pairs", TOWERS}
    st.publish({"pairs": first["pairs"], TOWERS: first[TOWERS]})
    second = mine(cfg, parent, recs["interactions"], recs["items"])
    assert second[TOWERS].fingerprint == first[TOWERS].fingerprint
    assert read_dataset(second["pairs"]).equals(read_dataset(first["pairs"]))
    st.publish({"pairs": second["pairs"], TOWERS: dataclasses.replace(second[TOWERS], schema_version=99)})
    third = mine(cfg, parent, recs["interactions"], recs["items"])
    m = [r["metrics"] for r in reversed(_stage_runs(cfg, "mine"))]           # newest first: reversed
    assert [x["u2i.reused"] for x in m] == [0.0, 1.0, 0.0]
    assert m[0]["u2i.train_seconds"] > 0 and m[1]["u2i.train_seconds"] == 0
    # without towers it may use, the third run's inputs are the first run's: its output is reused
    assert [x["reused"] for x in m] == [0.0, 0.0, 1.0]
    assert third[TOWERS].fingerprint == first[TOWERS].fingerprint


def test_nothing_is_published_or_started_after_a_stop_signal(prefect_harness, tiny_cfg, parent):
    """A stop whose exception was swallowed where it landed (seen inside Prefect's event service: the
    SIGTERM'd refresh ran on and published) still stops the run at the next stage or publish."""
    import signal

    from qarm_core.errors import Stopped, forget_stops, note_stop

    recs = ingest(tiny_cfg, parent)
    note_stop(signal.SIGTERM)
    try:
        with pytest.raises(Stopped):
            publish(tiny_cfg, parent, recs)
        with pytest.raises(Stopped):
            ingest(tiny_cfg, parent)
    finally:
        forget_stops()
    assert Storage(tiny_cfg.home).current() is None
    assert publish(tiny_cfg, parent, recs).snapshot_id == Storage(tiny_cfg.home).current().snapshot_id


def test_a_stop_ends_the_wait_for_dask_shards_that_are_still_running():
    """The stage's thread waits for its shards a second at a time, so a stop recorded while it waits
    (a signal landing in a lock's wait is only recorded) ends the stage, and its queued shards are
    cancelled, without waiting for a shard that may run for minutes."""
    import concurrent.futures
    import signal
    import threading
    import time

    from qarm_core.errors import Stopped, forget_stops, note_stop
    from qarm_core.executor import ExecutorConfig
    from tasks.executor import DaskShards

    class NeverDone:
        """A shard's future as the runner returns it: running until cancelled."""

        def __init__(self):
            self.wrapped_future = concurrent.futures.Future()

        def add_done_callback(self, fn):
            self.wrapped_future.add_done_callback(lambda _: fn(self))

    class Runner:
        def __init__(self):
            self.submitted: list[NeverDone] = []

        def submit(self, task, parameters):
            self.submitted.append(NeverDone())
            return self.submitted[-1]

    runner = Runner()
    threading.Timer(0.5, note_stop, (signal.SIGTERM,)).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Stopped):
            DaskShards(runner, ExecutorConfig(kind="dask"), 2).run(len, [[1], [2], [3]], "test")
    finally:
        forget_stops()
    assert time.monotonic() - t0 < 5
    assert len(runner.submitted) == 3 and all(f.wrapped_future.cancelled() for f in runner.submitted)


def test_the_baselines_are_scored_again_when_their_validation_pairs_change(tiny_cfg):
    """The baselines stage's outputs are reused by key: a change of which validation pairs the gate
    scores (embed.eval_max_pairs, eval_k) must give a new key, or the gate would compare the new
    model's recall with baselines scored on other pairs; a training setting must not."""
    from qarm_core.storage import DatasetRecord
    from tasks.embed import baselines_key_inputs

    recs = [DatasetRecord(name, f"/x/{name}", 1, 1, f"fp-{name}") for name in ("items", "train", "valid")]

    def key(**embed):
        cfg = tiny_cfg.model_copy(update={"embed": tiny_cfg.embed.model_copy(update=embed)})
        return baselines_key_inputs(cfg, *recs)

    assert key(eval_max_pairs=10) != key(eval_max_pairs=20) != key(eval_max_pairs=None)
    assert key(eval_k=5) != key(eval_k=10)
    train = tiny_cfg.embed.train.model_copy(update={"max_steps": tiny_cfg.embed.train.max_steps + 1})
    assert key(train=train) == key()


def test_reused_towers_are_published_as_they_are_on_a_growing_catalog(prefect_harness, tiny_cfg, parent, tmp_path):
    """Daily runs on a catalog that grows each day publish the towers they reused unchanged (the
    trained ones), so each day counts every item the training never saw: day 2 both growth days'."""
    from pathlib import Path

    from qarm_core.schemas import INTERACTIONS, ITEMS
    from qarm_core.storage import write_parquet_dataset
    from qarm_core.synth import (GrowthSpec, SynthSpec, iter_growth_interactions, iter_growth_items,
                                 iter_synthetic_interactions, iter_synthetic_items)
    from tasks.mine import TOWERS, mine

    cfg = tiny_cfg.model_copy(update={"mine": tiny_cfg.mine.model_copy(update={
        "sources": ["u2i"], "u2i": tiny_cfg.mine.u2i.model_copy(update={"reuse_model": True})})})
    spec = SynthSpec(users=300, items=400, interactions=12_000, seed=1)
    day1 = GrowthSpec(spec, day=1, new_items=4, new_interactions=1_200)
    items, events = [list(iter_synthetic_items(spec))], [list(iter_synthetic_interactions(spec))]
    for g in (day1, day1.next_day()):
        items.append(items[-1] + list(iter_growth_items(g)))
        events.append(events[-1] + list(iter_growth_interactions(g)))
    recs = [(write_parquet_dataset(tmp_path / f"e{d}", iter(events[d]), INTERACTIONS),
             write_parquet_dataset(tmp_path / f"i{d}", iter(items[d]), ITEMS)) for d in range(3)]
    st = Storage(cfg.home)
    out = []
    for ev, it in recs:
        out.append(mine(cfg, parent, ev, it))
        st.publish({"pairs": out[-1]["pairs"], TOWERS: out[-1][TOWERS]})
    m = [r["metrics"] for r in reversed(_stage_runs(cfg, "mine"))]           # newest first: reversed
    assert [x["u2i.reused"] for x in m] == [0.0, 1.0, 1.0]
    assert [x.get("u2i.items_unseen") for x in m[1:]] == [4.0, 8.0]
    assert out[0][TOWERS].fingerprint == out[1][TOWERS].fingerprint == out[2][TOWERS].fingerprint
    assert len(np.load(Path(out[2][TOWERS].path) / "item_ids.npy")) == 400


def test_qa_defers_while_the_published_model_is_reused(prefect_harness, tiny_cfg, parent, tmp_path):
    """A run that reuses the published model trains nothing, and only training reads QA: the QA task
    asks nothing new, publishes yesterday's rows and counts the items it deferred; the next run that
    trains answers exactly those (its output is not the deferring run's cached table), and
    ``qa.when_model_reused: generate`` answers them on the day."""
    from qarm_core.schemas import JUDGMENTS
    from qarm_core.storage import DatasetRecord, write_parquet_dataset
    from tasks.judge import qa

    items = ingest(tiny_cfg, parent)["items"]

    def verdicts(name: str, n_items: int):
        src = np.arange(n_items - 1, dtype=np.int64)
        t = pa.table({"src_item": src, "dst_item": src + 1, "source": ["swing"] * len(src), "model_id": ["m"] * len(src),
                      "prompt_version": ["p"] * len(src), "score": np.ones(len(src)), "keep": [True] * len(src),
                      "reasoning": pa.nulls(len(src), pa.string()), "text_hash": ["h"] * len(src)},
                     schema=JUDGMENTS.schema)
        return write_parquet_dataset(tmp_path / name, [t], JUDGMENTS)

    first = qa(tiny_cfg, parent, verdicts("j1", 10), items)["qa"]       # no model published: answered
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"0")
    model = DatasetRecord(dataset="model", path=str(tmp_path / "model"), rows=0, schema_version=1, fingerprint="m0")
    st = Storage(tiny_cfg.home)
    st.publish({"qa": first, "model": model})
    daily = tiny_cfg.model_copy(update={"embed": tiny_cfg.embed.model_copy(update={"reuse_model": True})})
    j2 = verdicts("j2", 15)
    deferred = qa(daily, parent, j2, items)["qa"]
    runs = [r for r in _stage_runs(tiny_cfg, "qa")]                     # newest first
    assert runs[0]["metrics"]["items.deferred"] == 5 and runs[0]["metrics"]["questions.deferred"] == 10
    assert runs[0]["metrics"]["items.generated"] == 0 and runs[0]["params"]["defer"] == "True"
    assert read_dataset(deferred).to_pylist() == read_dataset(first).to_pylist()
    weekly = qa(tiny_cfg, parent, j2, items)["qa"]                     # trains: not the deferring run's cache
    assert _stage_runs(tiny_cfg, "qa")[0]["metrics"]["items.generated"] == 5
    assert set(read_dataset(weekly)["item_id"].to_pylist()) == set(range(15))
    on_the_day = daily.model_copy(update={"qa": daily.qa.model_copy(update={"when_model_reused": "generate"})})
    assert read_dataset(qa(on_the_day, parent, j2, items)["qa"]).to_pylist() == read_dataset(weekly).to_pylist()
    assert "items.deferred" not in _stage_runs(tiny_cfg, "qa")[0]["metrics"]
