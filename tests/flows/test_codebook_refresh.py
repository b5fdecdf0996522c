"""The whole codebook-refresh DAG on the tiny config under prefect_test_harness."""

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest

from flows.codebook_refresh import codebook_refresh
from qarm_core.config import load_config
from qarm_core.errors import ConfigError, GateError
from qarm_core.storage import Storage, read_dataset
from tasks import tracking
from tests.support.paths import TINY


def _cfg(home):
    return load_config(TINY, {"home": str(home)}).resolved()


@pytest.fixture(scope="module")
def refreshed(prefect_harness, tmp_path_factory):
    """Two refreshes of the tiny config into one fresh home: the first publishes from scratch, the
    second reruns over the same data. Shared by the per-stage tests below."""
    home = tmp_path_factory.mktemp("refresh") / "home"
    sets = {"home": str(home), "tracking.plots": True}    # the suite's tiny config turns plots off
    out = codebook_refresh(TINY, sets)
    st = Storage(home)
    first = {"snapshot_id": st.current().snapshot_id, "codes": read_dataset(st.current().record("codes"))}
    dead = _plant_a_killed_refresh(home)          # the second refresh finds what a SIGKILL leaves
    out2 = codebook_refresh(TINY, sets)
    cfg = _cfg(home)
    runs = tracking.runs_of(cfg)
    children = {r["name"]: r for r in runs if r["tags"].get("mlflow.parentRunId") == out["mlflow_run_id"]}
    return {"home": home, "out": out, "out2": out2, "cfg": cfg, "storage": st, "runs": runs,
            "children": children, "first": first, "dead": dead}


def _plant_a_killed_refresh(home) -> dict:
    """What a refresh killed mid-run leaves: its MLflow runs RUNNING, its Prefect flow run Running, a
    half-written stage folder, and a lease naming its (now gone) pid and runs."""
    import json
    import socket
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from qarm_core.lease import LEASE_FILE
    from qarm_core.storage import _owner_tag

    cfg = _cfg(home)
    client = tracking._client(cfg)
    run = client.create_run(tracking.experiment_id(cfg), run_name="killed-refresh").info.run_id
    child = client.create_run(tracking.experiment_id(cfg), run_name="killed-judge",
                              tags={"mlflow.parentRunId": run}).info.run_id
    with get_client(sync_client=True) as prefect_client:
        flow_run = str(prefect_client.create_flow_run(codebook_refresh, state=Running()).id)
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                             capture_output=True, text=True).stdout)
    leftover = Storage(home).work_dir / "judge" / f".tmp-0123456789-{_owner_tag().rsplit('_', 1)[0]}_{pid}-abcdef01"
    leftover.mkdir(parents=True)
    (home / LEASE_FILE).write_text(json.dumps({"owner": "gone", "pid": pid, "host": socket.gethostname(),
                                               "purpose": "codebook-refresh", "acquired_at": time.time(),
                                               "heartbeat_at": time.time(), "run_id": run,
                                               "flow_run_id": flow_run}))
    return {"runs": [run, child], "flow_run": flow_run, "leftover": leftover}


def _published(refreshed, dataset):
    """The first refresh's published dataset (the second publishes the same data)."""
    return read_dataset(refreshed["storage"].current().record(dataset))


def test_refresh_publishes_a_snapshot_of_every_dataset(refreshed):
    out, st = refreshed["out"], refreshed["storage"]
    assert refreshed["first"]["snapshot_id"] == out["snapshot_id"]
    assert out["rows"]["interactions"] == 800 and out["rows"]["items"] == 40 and out["rows"]["pairs"] > 10
    assert _published(refreshed, "interactions").num_rows == 800
    assert _published(refreshed, "pairs").num_rows == out["rows"]["pairs"]
    assert out["rows"]["embeddings"] == out["rows"]["codes"] == 40
    assert "config.json" in st.current().record("model").files
    assert "codebook.json" in st.current().record("codebook").files


def test_flow_run_tracks_config_hardware_and_one_run_per_stage(refreshed):
    out, children = refreshed["out"], refreshed["children"]
    parent = [r for r in refreshed["runs"] if r["run_id"] == out["mlflow_run_id"]]
    assert len(parent) == 1 and parent[0]["status"] == "FINISHED"
    # the name says what ran (flow, trigger, config, overrides); the tags link the Prefect run and the commit
    assert parent[0]["name"] == f"codebook-refresh manual tiny [home={refreshed['home']}, tracking.plots=True]"
    tags = parent[0]["tags"]
    assert tags["qarm.flow"] == "codebook-refresh" and tags["mlflow.source.name"] == "flows/codebook_refresh.py:codebook_refresh"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["qarm.git.dirty"] in ("true", "false")
    assert tags["prefect.flow_run_id"] and tags["prefect.flow_run_url"].endswith(tags["prefect.flow_run_id"])
    assert parent[0]["params"]["config.ingest.synth.users"] == "60"
    assert "native bf16: " in parent[0]["tags"]["qarm.hardware"]      # CPU model and flags beside every run
    assert set(children) == {"ingest", "gate-ingest-items", "gate-ingest-interactions", "split", "mine",
                             "gate-mine-pairs", "judge", "gate-judge-judgments", "qa", "gate-qa-qa", "baselines", "train",
                             "embed", "gate-embed-embeddings", "quantize", "gate-quantize-codes", "publish"}
    assert all(r["status"] == "FINISHED" for r in children.values())
    assert children["ingest"]["metrics"]["rows.interactions"] == 800.0
    for gate, dataset in (("gate-ingest-interactions", "interactions"), ("gate-judge-judgments", "judgments"),
                          ("gate-embed-embeddings", "embeddings")):
        assert children[gate]["metrics"][f"gate.{dataset}.success"] == 1.0


def test_mine_logs_pairs_per_source_and_recall(refreshed):
    mined = refreshed["children"]["mine"]["metrics"]
    assert mined["swing.pairs"] + mined["u2i.pairs"] == refreshed["out"]["rows"]["pairs"] and mined["u2i.pairs"] > 0
    assert {"u2i.recall_two_tower", "u2i.recall_popularity"} <= mined.keys()   # values: test_two_tower.py


def test_judge_scores_every_pair_once_with_keep_rates_and_auc(refreshed):
    out, judge = refreshed["out"], refreshed["children"]["judge"]
    judged = judge["metrics"]
    assert out["rows"]["judgments"] == out["rows"]["pairs"] == judged["pairs.scored"]
    # each source's keep rule is calibrated on validation labels (a threshold on the score, the
    # rejection rate measured) or, with too few labels, its fraction, and the tag says which
    judgments = _published(refreshed, "judgments")
    for source, fraction in (("swing", 0.9), ("u2i", 0.3)):
        rule = judge["tags"][f"qarm.{source}.keep_rule"]
        part = judgments.filter(pc.equal(judgments["source"], source))
        kept = part["keep"].to_numpy(zero_copy_only=False)
        assert judged[f"{source}.keep_rate"] == pytest.approx(kept.mean())
        assert judged[f"{source}.valid.labelled"] >= 0
        if rule.startswith("calibrated"):
            score = part["score"].to_numpy()
            assert (kept == (score >= judged[f"{source}.threshold"])).all()
        else:
            assert rule.startswith("imposed") and kept.mean() == pytest.approx(fraction, abs=0.05)
    assert judged["pairs_per_s"] > 0 and "auc.cooc" in judged and "auc.genre" in judged
    assert judge["tags"]["qarm.prompt_version"] == "pmi-generic-v1"


def test_models_run_in_the_configured_or_hardware_chosen_type(refreshed):
    from qarm_core.devices import choose_dtype

    children = refreshed["children"]
    assert children["judge"]["tags"]["qarm.dtype"] == "float32"          # set by the test config
    auto = choose_dtype("auto", "cpu").name
    assert children["train"]["tags"]["qarm.dtype"] == children["embed"]["tags"]["qarm.dtype"] == auto
    assert children["embed"]["tags"]["qarm.dtype_reason"].startswith("auto:")
    # each LLM stage records its CPU threads (MKL's beside torch's: their mismatch once halved them)
    for stage in ("judge", "qa", "embed"):
        assert "fewer" not in children[stage]["tags"]["qarm.threads"]


def test_qa_covers_the_items_of_kept_pairs(refreshed):
    kept = _published(refreshed, "judgments").filter(pc.field("keep"))
    kept_items = set(kept["src_item"].to_pylist()) | set(kept["dst_item"].to_pylist())
    qa = _published(refreshed, "qa")
    assert set(qa["item_id"].to_pylist()) == kept_items and qa.num_rows == 2 * len(kept_items)
    assert refreshed["children"]["qa"]["metrics"]["items.generated"] == len(kept_items)


def test_train_and_embed_log_steps_and_validation_recall_and_the_gate(refreshed):
    trained = refreshed["children"]["train"]["metrics"]
    assert trained["steps"] == 4 and trained["tokens_per_s"] > 0 and "loss" in trained
    embed = refreshed["children"]["embed"]
    m = embed["metrics"]
    assert m["eval.pairs"] > 0
    assert {f"valid.{n}.recall_at_{k}" for n in ("finetuned", "base", "minilm") for k in (10, 50)} <= set(m)
    # first run: the reference is the base model; the verdict follows the two measured recalls
    assert m["gate.passed"] == float(m["valid.finetuned.recall_at_10"] > m["valid.base.recall_at_10"])
    assert embed["tags"]["qarm.model_choice"] == "finetuned" and embed["tags"]["qarm.embed.gate"]


def test_a_new_model_is_published_only_if_it_beats_the_published_one(prefect_harness, tmp_path):
    """Second refresh with another training budget: the new model is compared with the published
    one on the same validation pairs, and the snapshot holds whichever won."""
    home = tmp_path / "home"
    first = codebook_refresh(TINY, {"home": str(home)})
    model0 = Storage(home).current().record("model")
    # the weekly retrain: continue from the published model, held near its embeddings (stability term)
    second = codebook_refresh(TINY, {"home": str(home), "embed.train.max_steps": 6,
                                     "embed.train.init_from": "published", "embed.train.stability_weight": 1.0})
    runs = tracking.runs_of(_cfg(home))
    train = next(r for r in runs if r["name"] == "train" and r["tags"]["mlflow.parentRunId"] == second["mlflow_run_id"])
    assert train["params"]["started_from"] == model0.path
    assert "stability" in train["metrics"]            # the published embeddings anchored the run
    # the continued model is named after the base model it descends from, and says where it started
    from qarm_core.embed.model import read_meta

    meta0 = read_meta(model0.path)
    meta1 = read_meta(Storage(home).stage_dir("train", train["params"]["key"]) / "model")
    assert meta1["base_model"] == meta0["base_model"] and meta1["started_from"] == meta0["model_version"]
    assert meta1["model_version"].split(":")[1] == meta0["model_version"].split(":")[1] != "model"
    embed = next(r for r in runs if r["name"] == "embed" and r["tags"]["mlflow.parentRunId"] == second["mlflow_run_id"])
    m = embed["metrics"]
    new_wins = m["valid.finetuned.recall_at_10"] > m["valid.published.recall_at_10"]
    assert embed["tags"]["qarm.model_choice"] == ("finetuned" if new_wins else "published")
    assert m["gate.passed"] == float(new_wins)
    published = Storage(home).current()
    assert (published.record("model").fingerprint == model0.fingerprint) == (not new_wins)
    versions = set(read_dataset(published.record("embeddings"))["model_version"].to_pylist())
    assert len(versions) == 1 and first["snapshot_id"] != second["snapshot_id"]
    # the codebook follows the model: a new model's fit starts from the old cells' items, matched onto the old SIDs
    quantize = next(r for r in runs if r["name"] == "quantize" and r["tags"]["mlflow.parentRunId"] == second["mlflow_run_id"])
    old_version, new_version = quantize["tags"]["qarm.codebook.lineage"].split(" -> ")
    assert new_version == versions.pop() and (old_version != new_version) == new_wins
    if new_wins:
        assert "carried over by their items" in quantize["tags"]["qarm.quantize.how"] and "lineage.c1_kept" in quantize["metrics"]
    else:
        assert quantize["tags"]["qarm.quantize.how"] == "warm_start"


def test_quantize_gives_one_sid_per_item(refreshed):
    coded = refreshed["children"]["quantize"]
    # the logged raw collision is the one the published codes show (c3_raw, before resolution)
    codes = refreshed["first"]["codes"]
    raw = codes.group_by(["c1", "c2", "c3_raw"]).aggregate([("item_id", "count")])
    shared = sum(c for c in raw["item_id_count"].to_pylist() if c > 1) / codes.num_rows
    assert coded["metrics"]["raw.collision_rate"] == pytest.approx(shared)
    assert coded["metrics"]["resolved.collision_rate"] <= coded["metrics"]["raw.collision_rate"]
    assert coded["tags"]["qarm.quantize.how"] == "refit: no published codebook"
    assert len(set(refreshed["first"]["codes"]["sid"].to_pylist())) == 40


def test_resolved_config_and_gate_reports_are_artifacts(refreshed, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(refreshed["cfg"].tracking.tracking_uri)
    run_id = refreshed["out"]["mlflow_run_id"]
    text = Path(client.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path))).read_text()
    assert f"home: {refreshed['home']}" in text
    gate_run = refreshed["children"]["gate-ingest-items"]["run_id"]
    assert json.loads(Path(client.download_artifacts(gate_run, "gates/items.json", str(tmp_path))).read_text())["success"]


def test_the_parent_run_is_the_comparison_surface(refreshed, tmp_path):
    """Each refresh's parent run holds its headline metrics (copied from the stage runs), the
    plots and a summary page, also published as the Prefect flow run's markdown artifact; the
    experiment opens in MLflow's runs table."""
    from mlflow.tracking import MlflowClient

    cfg, out, children = refreshed["cfg"], refreshed["out"], refreshed["children"]
    client = MlflowClient(cfg.tracking.tracking_uri)
    parent = client.get_run(out["mlflow_run_id"])
    top = parent.data.metrics
    for stage, metric in (("quantize", "raw.collision_rate"), ("quantize", "resolved.collision_rate"),
                          ("quantize", "raw.decode_hr_at_1"), ("quantize", "raw.decode_hr_at_10"),
                          ("quantize", "raw.edge_num"), ("embed", "valid.finetuned.recall_at_10"),
                          ("judge", "swing.rejection_rate"), ("judge", "u2i.rejection_rate")):
        assert top[f"{stage}.{metric}"] == children[stage]["metrics"][metric], (stage, metric)
    assert not any(k.startswith("judge.") and k.endswith("_per_s") for k in top)      # only the headline
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/quantize_codes.png", "plots/judge_scores.png", "plots/train_loss.png"}
    png = Path(client.download_artifacts(parent.info.run_id, "plots/quantize_codes.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    summary = Path(client.download_artifacts(parent.info.run_id, "summary.md", str(tmp_path))).read_text()
    assert out["snapshot_id"] in summary and f"runs/{parent.info.run_id}" in summary
    assert f"| quantize.raw.collision_rate | {top['quantize.raw.collision_rate']:.4f} |" in summary
    assert "| ingest/interactions | passed |" in summary and "**failed**" not in summary

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect:
        arts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[parent.data.tags["prefect.flow_run_id"]])))
    assert [a.key for a in arts] == ["tiny-codebook-refresh-summary"] and arts[0].data == summary


def test_runs_compare_prints_the_headline_of_refreshes_side_by_side(refreshed):
    from typer.testing import CliRunner

    from flows.runs_cli import app

    res = CliRunner().invoke(app, ["compare", "--last", "2", "--config", TINY, "--set", f"home={refreshed['home']}"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "quantize.raw.collision_rate" in res.output and "judge.swing.rejection_rate" in res.output
    assert refreshed["out"]["mlflow_run_id"] in res.output and refreshed["out2"]["mlflow_run_id"] in res.output
    bad = CliRunner().invoke(app, ["compare", "--config", TINY, "--set", f"home={refreshed['home']}/nothing-here"])
    assert bad.exit_code == 1 and "no codebook-refresh runs" in bad.output
    unknown = CliRunner().invoke(app, ["compare", "0123abc", "--config", TINY, "--set", f"home={refreshed['home']}"])
    assert unknown.exit_code == 2 and "error:" in unknown.output and "0123abc" in unknown.output


def test_rerun_reuses_staged_outputs_and_keeps_sids(refreshed):
    out, out2, st = refreshed["out"], refreshed["out2"], refreshed["storage"]
    assert st.current().snapshot_id == out2["snapshot_id"] != out["snapshot_id"]
    runs = tracking.runs_of(refreshed["cfg"])
    for stage in ("ingest", "split", "mine", "judge", "qa", "baselines", "train", "embed"):
        assert sorted(r["metrics"]["reused"] for r in runs if r["name"] == stage) == [0.0, 1.0]
    # the rerun warm-starts the quantizer from the published codebook: same SIDs
    hows = sorted(r["tags"]["qarm.quantize.how"] for r in runs if r["name"] == "quantize")
    assert hows == ["refit: no published codebook", "warm_start"]
    started = {r["tags"]["qarm.quantize.how"]: r["tags"]["qarm.quantize.previous"] for r in runs if r["name"] == "quantize"}
    assert started["refit: no published codebook"] == "none" and started["warm_start"].endswith("codebook")
    # a reused output keeps the earlier run's quality figures, not its timings (nothing was scored now)
    judged = {r["metrics"]["reused"]: r["metrics"] for r in runs if r["name"] == "judge"}
    assert "pairs_per_s" in judged[0.0] and "pairs_per_s" not in judged[1.0]
    assert judged[1.0]["auc.cooc"] == judged[0.0]["auc.cooc"]
    assert read_dataset(st.current().record("codes")).sort_by("item_id")["sid"].to_pylist() == \
        refreshed["first"]["codes"].sort_by("item_id")["sid"].to_pylist()


def test_daily_refresh_costs_follow_the_change(prefect_harness, tmp_path):
    """The daily deployment's mode on a second day with more neighbours per item: only the pairs
    not judged yesterday are scored (the evaluation comes from yesterday's scores), only items
    without QA get new QA, the published model is reused and no unchanged item is embedded again."""
    home = tmp_path / "home"
    sticky = {"mine.swing.keep_published_depth": 2.0}      # the ML-100K config's stable neighbour lists
    first = codebook_refresh(TINY, {"home": str(home), "mine.swing.top_k": 5} | sticky)
    second = codebook_refresh(TINY, {"home": str(home), "mine.swing.top_k": 10, "embed.reuse_model": True,
                                     "mine.u2i.reuse_model": True} | sticky)
    assert second["rows"]["pairs"] > first["rows"]["pairs"]
    runs = tracking.runs_of(_cfg(home))

    def of(stage: str, flow: dict) -> dict:
        return next(r["metrics"] for r in runs if r["name"] == stage
                    and r["tags"]["mlflow.parentRunId"] == flow["mlflow_run_id"])

    # the u2i miner mines with the towers the first day trained and published, untrained
    assert of("mine", first)["u2i.reused"] == 0 and of("mine", first)["u2i.train_seconds"] > 0
    assert of("mine", second)["u2i.reused"] == 1 and of("mine", second)["u2i.items_unseen"] == 0
    assert "u2i.train_seconds" not in of("mine", second) or of("mine", second)["u2i.train_seconds"] == 0
    snaps = [Storage(home).snapshot(f["snapshot_id"]) for f in (first, second)]
    towers = [s.record("two_tower") for s in snaps]
    assert towers[0].fingerprint == towers[1].fingerprint       # same catalog: the same towers, byte for byte

    # every pair published yesterday is still among today's top 10 of the same log
    assert "swing.new" not in of("mine", first) and of("mine", second)["swing.kept_published"] == 0
    assert of("mine", second)["swing.new"] == second["rows"]["pairs"] - first["rows"]["pairs"]
    day1, day2 = of("judge", first), of("judge", second)
    assert day1["pairs.cached"] == 0 and day1["pairs.scored"] == first["rows"]["pairs"]
    # new pairs judged yesterday under the other source take that score without the LLM (counted below)
    other = day2["pairs.cached.other_source"]
    assert day1["pairs.cached.other_source"] == 0
    assert day2["pairs.cached"] == first["rows"]["pairs"] + other
    assert day2["pairs.scored"] == second["rows"]["pairs"] - first["rows"]["pairs"] - other
    # the evaluation set is the same on the same log: its scores come from the published snapshot
    assert day2["eval.pairs.cached"] == day2["eval.pairs"] == day1["eval.pairs"] > 0
    assert day2["llm.pairs"] == day2["pairs.scored"] and day2["auc.cooc"] == day1["auc.cooc"]
    # yesterday's neutral passes are reused: only items first seen as B today get one
    assert day1["neutral.cached"] == 0 and day2["neutral.cached"] == day1["neutral.computed"] > 0
    assert of("train", second)["reused_published"] == 1.0
    e1, e2 = of("embed", first), of("embed", second)
    assert (e1["encoded"], e1["carried_over"]) == (40, 0) and (e2["encoded"], e2["carried_over"]) == (0, 40)
    assert "valid.base.recall_at_10" in e1 and "valid.base.recall_at_10" not in e2   # baselines: only for a new model
    assert "valid.finetuned.recall_at_10" in e1 and "valid.finetuned.recall_at_10" not in e2   # so is the model
    # the same model and embeddings: the warm-started codebook moves no SID, and the churn gate ran
    q2 = of("quantize", second)
    assert q2["churn"] == 0.0 and q2["churn_items"] == 40 and q2["fsq.refit"] == 0.0
    assert q2["gate.codes.success"] == 1.0 and q2["gate.codes.failed_checks"] == 0
    # yesterday's scores are reused as they were
    st = Storage(home)
    old = read_dataset(st.snapshot(first["snapshot_id"]).record("judgments"))
    new = read_dataset(st.current().record("judgments"))
    key = ["src_item", "dst_item", "source"]
    joined = old.select(key + ["score"]).join(new.select(key + ["score"]), keys=key, right_suffix="_new")
    assert joined.num_rows == old.num_rows
    old_rows = {(r["src_item"], r["dst_item"], r["source"]): r["score"] for r in old.to_pylist()}
    switched = [r for r in new.to_pylist() if (r["src_item"], r["dst_item"], r["source"]) not in old_rows
                and (r["src_item"], r["dst_item"], {"swing": "u2i", "u2i": "swing"}[r["source"]]) in old_rows]
    assert len(switched) == other
    assert all(r["score"] == old_rows[(r["src_item"], r["dst_item"], {"swing": "u2i", "u2i": "swing"}[r["source"]])]
               for r in switched)
    assert joined["score"].to_pylist() == joined["score_new"].to_pylist()

    # QA: the daily run trains nothing, and only training reads QA: it asks nothing and publishes
    # yesterday's rows, counting the items of today's kept pairs still lacking QA as deferred
    # (none here: yesterday's kept pairs held every item; tests/tasks covers a day that defers some)
    q1, q2 = of("qa", first), of("qa", second)
    assert "items.deferred" not in q1 and q1["items.generated"] > 0
    assert q2["items.generated"] == q2["questions"] == 0
    qa_of = [read_dataset(s.record("qa")) for s in (st.snapshot(first["snapshot_id"]), st.current())]
    assert qa_of[1].to_pylist() == qa_of[0].to_pylist()
    kept = new.filter(pc.fill_null(new["keep"], False))
    lacking = (set(kept["src_item"].to_pylist()) | set(kept["dst_item"].to_pylist())) - set(qa_of[0]["item_id"].to_pylist())
    assert q2["items.deferred"] == len(lacking)


def test_bad_input_fails_flow_and_keeps_published_snapshot(prefect_harness, tmp_path):
    home = tmp_path / "home"
    first = codebook_refresh(TINY, {"home": str(home)})
    pointer = (home / "CURRENT").read_bytes()
    # a user's items file with a duplicated id and interactions with a null user id
    (tmp_path / "items.csv").write_text("item_id,title\n" + "".join(f"{i},t{i}\n" for i in range(20)) + "3,dup\n")
    rows = "".join(f"{i % 7},{i % 20},{1000 + i},4\n" for i in range(200))
    (tmp_path / "inter.csv").write_text("user_id,item_id,ts,rating\n" + rows + ",5,9999,3\n")
    overrides = {"home": str(home), "ingest.source": "files",
                 "ingest.files.interactions": str(tmp_path / "inter.csv"),
                 "ingest.files.items": str(tmp_path / "items.csv")}
    with pytest.raises(GateError) as ei:
        codebook_refresh(TINY, overrides)
    msg = str(ei.value)
    assert "[stage=ingest, dataset=items]" in msg and "expect_compound_columns_to_be_unique" in msg
    assert "'title': 'dup'" in msg
    assert (home / "CURRENT").read_bytes() == pointer
    assert Storage(home).current().snapshot_id == first["snapshot_id"]
    runs = tracking.runs_of(_cfg(home))
    failed = [r for r in runs if r["tags"].get("qarm.flow") == "codebook-refresh" and r["status"] == "FAILED"]
    assert len(failed) == 1 and "GateError" in failed[0]["tags"]["qarm.error"]

    # fix the items file: now the interactions gate catches the null user id
    (tmp_path / "items.csv").write_text("item_id,title\n" + "".join(f"{i},t{i}\n" for i in range(20)))
    with pytest.raises(GateError, match=r"dataset=interactions.*not_be_null\(column='user_id'\)"):
        codebook_refresh(TINY, overrides)
    assert (home / "CURRENT").read_bytes() == pointer


def test_unknown_config_key_fails_before_any_work(prefect_harness, tmp_path):
    with pytest.raises(ConfigError, match="ingest.synth.userz: unknown key"):
        codebook_refresh(TINY, {"home": str(tmp_path / "h"), "ingest.synth.userz": 3})
    assert not (tmp_path / "h").exists()


# The refresh flow's own ingest path with one bad file (tests/reliability/test_bad_inputs.py feeds 35
# bad inputs through `qarm ingest`, which runs the same stage and gate).
BAD_INPUTS = {
    "nan rating": ("user_id,item_id,ts,rating\n1,1,3,nan\n" + "".join(f"{u},2,{u},4\n" for u in range(200)),
                   "expect_column_values_to_be_finite"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_names_stage_and_dataset_and_publishes_nothing(prefect_harness, tmp_path, case):
    from qarm_core.errors import DataError

    home = tmp_path / "home"
    first = codebook_refresh(TINY, {"home": str(home)})
    pointer = (home / "CURRENT").read_bytes()
    content, expected = BAD_INPUTS[case]
    name = "inter.parquet" if case == "unreadable parquet" else "inter.csv"
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "items.csv").write_text("item_id,title\n1,a\n2,b\n" + "".join(f"{i},t{i}\n" for i in range(3, 20)))
    with pytest.raises(DataError) as ei:
        codebook_refresh(TINY, {"home": str(home), "ingest.source": "files",
                                "ingest.files.interactions": str(tmp_path / name),
                                "ingest.files.items": str(tmp_path / "items.csv")})
    assert "stage=ingest, dataset=interactions" in str(ei.value) and expected in str(ei.value)
    assert (home / "CURRENT").read_bytes() == pointer
    assert Storage(home).list_snapshots() == [first["snapshot_id"]]


@pytest.mark.slow                      # > 10 s: `make test` runs it, `make test-fast` does not
def test_no_stage_of_the_refresh_reads_the_test_period(prefect_harness, tmp_path):
    """Perturbing (other items, flipped ratings) or dropping every test-period event leaves every
    dataset the refresh publishes, apart from the raw log and its period counts, bit-for-bit
    unchanged: pairs, judgments, QA, the model, embeddings, codes and the codebook."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qarm_core.ingest import resolve_source
    from qarm_core.split import resolve_cutoffs

    cfg = _cfg(tmp_path / "src")
    _, batches = resolve_source(cfg.ingest)
    inter = pa.Table.from_batches(list(batches["interactions"]()))
    items = pa.Table.from_batches(list(batches["items"]()))
    cut = resolve_cutoffs(inter["ts"].to_numpy(), cfg.split)
    test = cut.period_of(inter["ts"].to_numpy()) == 2
    assert 0 < test.sum() < inter.num_rows
    ids = np.sort(items["item_id"].to_numpy())
    shift = dict(zip(ids, np.roll(ids, 7)))            # a bijection: (user, item, ts) stays unique
    item = inter["item_id"].to_numpy().copy()
    item[test] = [shift[i] for i in item[test]]
    rating = inter["rating"].to_numpy().copy()
    rating[test] = 6.0 - rating[test]
    logs = {"original": inter,
            "perturbed": inter.set_column(1, "item_id", pa.array(item)).set_column(
                3, "rating", pa.array(rating, pa.float32())),
            "dropped": inter.filter(pa.array(~test))}
    pq.write_table(items, tmp_path / "items.parquet")
    published = {}
    for name, log in logs.items():
        pq.write_table(log, tmp_path / f"{name}.parquet")
        home = tmp_path / name
        codebook_refresh(TINY, {"home": str(home), "ingest.source": "files",
                                "ingest.files.interactions": str(tmp_path / f"{name}.parquet"),
                                "ingest.files.items": str(tmp_path / "items.parquet"),
                                "split.valid_start": cut.valid_start, "split.test_start": cut.test_start})
        snap = Storage(home).current()
        published[name] = {d: snap.record(d).fingerprint for d in snap.manifest["datasets"]}
    learned = set(published["original"]) - {"interactions", "periods"}
    assert {"train_events", "valid_events", "pairs", "judgments", "qa", "model", "embeddings", "codes"} <= learned
    for name in ("perturbed", "dropped"):
        assert published[name]["interactions"] != published["original"]["interactions"]
        differ = sorted(d for d in learned if published[name][d] != published["original"][d])
        assert differ == [], f"{name}: {differ} changed with the test period"


def test_items_renamed_under_stable_ids_are_judged_and_asked_again(refreshed, tmp_path):
    """The judge and QA tasks of the next run after some items changed their titles (same ids), with
    the published snapshot as their cache: every pair touching a renamed item is judged again from
    its new text, exactly those, and its QA is written again; nothing stale comes out."""
    import pyarrow as pa

    from qarm_core.judge.judge import pair_text_hashes
    from qarm_core.judge.prompts import judge_prompt
    from qarm_core.judge.qa import item_field_hash
    from qarm_core.schemas import ITEMS
    from qarm_core.storage import write_parquet_dataset
    from tasks.judge import judge, qa

    cfg, snap = refreshed["cfg"], refreshed["storage"].current()
    items = read_dataset(snap.record("items"))
    renamed_ids = set(items["item_id"].to_pylist()[::5])
    titles = [f"Wireless Headphones #{i}" if i in renamed_ids else t
              for i, t in zip(items["item_id"].to_pylist(), items["title"].to_pylist())]
    items1 = items.set_column(items.column_names.index("title"), "title", pa.array(titles, pa.string()))
    items_rec = write_parquet_dataset(tmp_path / "items", [items1], ITEMS)
    with tracking.flow_run(cfg, "test-renamed") as run_id:
        out = judge(cfg, run_id, snap.record("pairs"), items_rec, snap.record("train_events"),
                    snap.record("valid_events"))
        out |= qa(cfg, run_id, out["judgments"], items_rec)
    judgments = read_dataset(out["judgments"])
    touched = [a in renamed_ids or b in renamed_ids for a, b in zip(judgments["src_item"].to_pylist(),
                                                                     judgments["dst_item"].to_pylist())]
    assert 0 < sum(touched) < judgments.num_rows
    assert judgments["text_hash"].to_pylist() == pair_text_hashes(judgments, items1,
                                                                  judge_prompt(cfg.judge.prompt_version).item_format)
    old = {(r["src_item"], r["dst_item"], r["source"]): r["score"] for r in read_dataset(snap.record("judgments")).to_pylist()}
    kept = [r["score"] == old[(r["src_item"], r["dst_item"], r["source"])]
            for r, t in zip(judgments.to_pylist(), touched) if not t]
    assert all(kept)                                                       # untouched pairs: from the cache
    judge_run = next(r["metrics"] for r in tracking.runs_of(cfg) if r["name"] == "judge"
                     and r["tags"]["mlflow.parentRunId"] == run_id)
    assert judge_run["pairs.scored"] == sum(touched)                      # exactly the renamed items' pairs
    table = read_dataset(out["qa"])
    by_id = {r["item_id"]: r for r in items1.to_pylist()}
    assert table["text_hash"].to_pylist() == [item_field_hash(by_id[i]) for i in table["item_id"].to_pylist()]
    renamed_qa = [r for r in table.to_pylist() if r["item_id"] in renamed_ids]
    old_titles = {r["item_id"]: r["title"] for r in items.to_pylist()}
    assert renamed_qa and all(old_titles[r["item_id"]] not in r["question"] + r["answer"] for r in renamed_qa)


def test_a_second_refresh_on_a_held_home_stops_before_any_work(prefect_harness, tmp_path):
    """A refresh on a home another live run holds stops before any work (not even the MLflow store
    is created) and names the holder."""
    from qarm_core.lease import LEASE_FILE, BusyError, Lease

    home = tmp_path / "home"
    holder = Lease(home, "codebook-refresh").acquire()
    try:
        with pytest.raises(BusyError, match="in use by another codebook-refresh"):
            codebook_refresh(TINY, {"home": str(home)})
        assert sorted(p.name for p in home.iterdir()) == [LEASE_FILE, LEASE_FILE + ".lock"]
    finally:
        holder.release()


def test_a_refresh_after_a_killed_one_closes_what_it_left(refreshed):
    """The second refresh of the fixture found a killed refresh's lease: it took it over, marked the
    dead MLflow runs FAILED and its Prefect flow run Crashed, removed its half-written folder, and
    published; its own lease is gone after."""
    from prefect.client.orchestration import get_client

    from qarm_core.lease import LEASE_FILE

    dead = refreshed["dead"]
    runs = {r["run_id"]: r for r in refreshed["runs"]}
    assert all(runs[r]["status"] == "FAILED" and "abandoned" in runs[r]["tags"]["qarm.error"] for r in dead["runs"])
    assert runs[refreshed["out2"]["mlflow_run_id"]]["status"] == "FINISHED"
    with get_client(sync_client=True) as prefect_client:
        assert prefect_client.read_flow_run(dead["flow_run"]).state.is_crashed()
    assert not dead["leftover"].exists() and not (refreshed["home"] / LEASE_FILE).exists()


@pytest.mark.slow
def test_a_refresh_on_two_dask_workers_into_an_s3_home_publishes_what_the_local_refresh_published(
        refreshed, tmp_path, tmp_path_factory, monkeypatch):
    """executor.kind=dask (a 2-worker local cluster started for the run, each shard a Prefect task
    run) and QARM_HOME on an S3 server (moto's, on 127.0.0.1; snapshots and CURRENT there, the
    working folders in QARM_LOCAL_ROOT; the shards' files through the store, into the workers'
    own local root): every published dataset, downloaded again from the store,
    is bit for bit the single-process run's, except the judge's float scores, which may differ in
    the last bits: the workers' models run on 1 thread, the local one on 2, and a matmul's sums are split differently (bit for bit with equal threads,
    tests/unit/test_executor.py); its keep verdicts, and so all that is trained on them, are equal."""
    import numpy as np
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from qarm_core.storage import LOCAL_ROOT_ENV
    from tests.support.s3 import moto_s3_server, use_s3_server

    with moto_s3_server() as server:
        home = use_s3_server(monkeypatch, server, tmp_path_factory)          # s3://<bucket>/<prefix>
        monkeypatch.setenv(LOCAL_ROOT_ENV, str(tmp_path / "local"))
        # the workers pass their files through the store (as on hosts without a shared filesystem)
        # into local roots of their own
        workers_root = tmp_path / "workers"
        out = codebook_refresh(TINY, {"home": home, "executor.kind": "dask", "executor.workers": 2,
                                      "executor.scratch": "object_store",
                                      "executor.worker_env": {LOCAL_ROOT_ENV: str(workers_root)}})
        st = Storage(home)
        from qarm_core.scratch import SCRATCH

        assert len(list(workers_root.rglob("cache/scratch/*/model/config.json"))) == 1   # the model, fetched once
        assert not st.remote.fs.find(st.remote.path(SCRATCH))           # the scratch prefix is cleared
        assert st.remote.current() == out["snapshot_id"] and st.list_snapshots() == [out["snapshot_id"]]
        assert st.home.is_relative_to(tmp_path / "local") and not (st.home / "CURRENT").exists()
        assert sorted(st.remote.manifest(out["snapshot_id"])["datasets"]) == sorted(out["rows"])
        import shutil

        shutil.rmtree(st.snapshots_dir / out["snapshot_id"])            # read it back from the store
        got_snap = st.current()
    local_snap = refreshed["storage"].snapshot(refreshed["first"]["snapshot_id"])
    got, local = got_snap.manifest["datasets"], local_snap.manifest["datasets"]
    floats = {"judgments": ["score"], "judge_eval": ["pmi", "cos", "tag_cos"], "judge_neutral": ["neutral"]}
    assert set(got) == set(local)
    assert {k: (d["fingerprint"], d["rows"]) for k, d in got.items() if k not in floats} == \
        {k: (d["fingerprint"], d["rows"]) for k, d in local.items() if k not in floats}
    for name, cols in floats.items():
        a, b = read_dataset(got_snap.record(name)), read_dataset(local_snap.record(name))
        assert a.drop_columns(cols).equals(b.drop_columns(cols)), name
        for c in cols:
            np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=0, atol=1e-5, err_msg=f"{name}.{c}")
    runs = tracking.runs_of(_cfg(home))
    parent = next(r for r in runs if r["run_id"] == out["mlflow_run_id"])
    embed_run = next(r for r in runs if r["name"] == "embed" and r["tags"].get("mlflow.parentRunId") == parent["run_id"])
    assert embed_run["tags"]["qarm.executor"] == "dask"
    assert embed_run["metrics"]["workers"] == 2.0                        # both workers wrote parts
    # each shard is a Prefect task run of this flow run: the 3 parts of the fine-tuned model's embedding
    flow_run_id = parent["tags"]["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                          limit=200)
    shards = sorted((t.name, t.state.type.value) for t in task_runs if t.name.startswith("embed-finetuned-"))
    assert shards == [(f"embed-finetuned-{k:05d}", "COMPLETED") for k in range(3)]
    llm = [t for t in task_runs if t.name.startswith(("judge-score-", "judge-generate-", "qa-generate-"))]
    assert len({t.name for t in llm if t.name.startswith("judge-score-")}) >= 4    # ~290 pairs / 64
    assert any(t.name.startswith("qa-generate-") for t in llm)
    assert all(t.state.type.value == "COMPLETED" for t in llm)
    # both baselines shard too (3 parts each, like the fine-tuned model's), and ran beside training
    assert {t.name for t in task_runs if t.name.startswith(("embed-base-", "embed-minilm-"))} == \
        {f"embed-{b}-{k:05d}" for b in ("base", "minilm") for k in range(3)}
    base, train = _task_run(task_runs, "embed-baselines"), _task_run(task_runs, "train-embedding-model")
    assert base.start_time < train.end_time and train.start_time < base.end_time, (base, train)
    # the single-process run ran them one after the other: the baselines first
    local_parent = next(r for r in tracking.runs_of(refreshed["cfg"]) if r["run_id"] == refreshed["out"]["mlflow_run_id"])
    with get_client(sync_client=True) as client:
        local_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[local_parent["tags"]["prefect.flow_run_id"]])), limit=200)
    assert _task_run(local_runs, "embed-baselines").end_time <= _task_run(local_runs, "train-embedding-model").start_time


def _task_run(task_runs, task_name: str):
    """The one task run of ``task_name`` (a task run is named ``<task>-<3 characters>``)."""
    (got,) = [t for t in task_runs if t.name.rsplit("-", 1)[0] == task_name]
    return got


@pytest.mark.slow
def test_qa_of_every_item_runs_beside_the_judge_on_a_dask_cluster(prefect_harness, tmp_path):
    """qa.items=all needs no verdicts: on a Dask executor the flow submits QA before the judge and
    the two stages' task runs overlap; QA then covers the whole catalog."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    home = tmp_path / "home"
    out = codebook_refresh(TINY, {"home": str(home), "executor.kind": "dask", "executor.workers": 2,
                                  "qa.items": "all"})
    snap = Storage(home).snapshot(out["snapshot_id"])
    catalog = read_dataset(snap.record("items"), columns=["item_id"])["item_id"].to_pylist()
    asked = read_dataset(snap.record("qa"), columns=["item_id"])["item_id"].to_pylist()
    assert set(asked) == set(catalog)
    parent = next(r for r in tracking.runs_of(_cfg(home)) if r["run_id"] == out["mlflow_run_id"])
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[parent["tags"]["prefect.flow_run_id"]])), limit=200)
    qa_run, judge_run = _task_run(task_runs, "qa-pairs"), _task_run(task_runs, "judge-pairs")
    assert qa_run.start_time < judge_run.end_time and judge_run.start_time < qa_run.end_time, (qa_run, judge_run)
