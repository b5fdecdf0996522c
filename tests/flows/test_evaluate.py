"""The evaluate flow on the tiny config: every section measured on the held-out periods, one MLflow
run, report.md with its plots; a clear error without a snapshot."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.codebook_refresh import codebook_refresh
from flows.evaluate import evaluate
from flows.rank_train import rank_train
from qarm_core.config import load_config
from qarm_core.errors import DataError
from qarm_core.storage import Storage, read_dataset
from tasks import tracking
from tests.support.paths import TINY

RANK = {"rank.samples.long_len": 30, "rank.samples.short_len": 5, "rank.gsu.top_k": 8, "rank.gsu.pca_dim": 8,
        "rank.model.dim": 8, "rank.model.att_hidden": 8, "rank.model.mlp_hidden": [16],
        "rank.model.vq_neighbours": 3, "rank.train.epochs": 2, "rank.train.seeds": [0, 1],
        "rank.train.batch_size": 128, "rank.train.lr_grid": [3e-3, 1e-2],
        "rank.models": ["din", "din_tags", "sim_hard", "ours_sid"]}


@pytest.mark.slow
def test_evaluate_reports_every_section_in_one_run(prefect_harness, tmp_path):
    home = tmp_path / "home"
    with pytest.raises(DataError, match=r"\[stage=evaluate, dataset=snapshot\].*qarm refresh"):
        evaluate(TINY, {"home": str(home)}, rank=False)
    codebook_refresh(TINY, {"home": str(home)})
    # an earlier comparison of the baselines (one lr) on the same samples, to pool with; refused
    # without the ranking section, and an unreadable file before any work
    earlier = rank_train(TINY, {"home": str(home), **RANK, "rank.train.lr_grid": [1e-2]},
                         models=["din", "din_tags", "sim_hard"])
    npz = MlflowClient(load_config(TINY, {"home": str(home)}).resolved().tracking.tracking_uri).download_artifacts(
        earlier["mlflow_run_id"], "rank/test_scores.npz", str(tmp_path))
    with pytest.raises(DataError, match=r"\[stage=evaluate, dataset=pool_with\].*drop --no-rank"):
        evaluate(TINY, {"home": str(home)}, rank=False, pool_with=[npz])
    with pytest.raises(DataError, match=r"\[stage=evaluate, dataset=.*nothing.npz\] --pool-with: not a comparison"):
        evaluate(TINY, {"home": str(home), **RANK}, pool_with=[str(tmp_path / "nothing.npz")])
    out = evaluate(TINY, {"home": str(home), **RANK}, out_dir=str(tmp_path / "report"), pool_with=[npz])
    s = out["sections"]
    # embeddings: the published model and both baselines answer the same pairs in both periods
    periods = {r["period"] for r in s["embeddings"]}
    assert periods == {"valid", "test"}
    for p in periods:
        rows = [r for r in s["embeddings"] if r["period"] == p]
        assert [r["model"] for r in rows] == ["published (fine-tuned)", "base", "minilm"]
        assert len({r["pairs"] for r in rows}) == 1
    assert {r["source"] for r in s["judge"]} == {"swing", "u2i"}
    # the rejection rates are the published verdicts', per source
    j = read_dataset(Storage(home).current().record("judgments")).to_pandas()
    for r in s["judge"]:
        assert r["rejection_rate"] == pytest.approx(1 - j[j.source == r["source"]].keep.mean())
    assert [r["variant"] for r in s["quantizer"]][1].startswith("residual k-means x2 + FSQ")
    assert [r["model"] for r in s["ranking"]] == RANK["rank.models"]
    text = Path(out["report"]).read_text()
    for heading in ("## Embeddings", "## Judge", "## Quantizer", "## Ranking"):
        assert heading in text
    # the ranking's test users by events before the test period: in the tiny log every test user has
    # some, so the other group has no AUC and is left out
    assert all(set(r["by_history"]) == {"with_history"} for r in s["ranking"])
    assert "### Test users with and without events before the test period" in text
    # pooled with the earlier comparison: the models of both, against this run's reference
    pooled = s["ranking_pooled"]
    valid = {r["model"]: (r["valid_auc_mean"] + next(e["valid_auc_mean"] for e in earlier["table"]
                                                     if e["model"] == r["model"])) / 2
             for r in s["ranking"] if r["kind"] == "baseline"}
    ref = max(valid, key=valid.get)            # the best baseline on validation, averaged over both
    assert pooled["error"] is None and pooled["reference"] == ref and pooled["sources"] == ["this run", npz]
    assert [r["model"] for r in pooled["rows"]] == ["din", "din_tags", "sim_hard"]
    assert all(r["runs"] == 4 and (r["vs_ref"] is None) == (r["model"] == ref) for r in pooled["rows"])
    assert all(set(r["by_history"]) == {"with_history"} for r in pooled["rows"])        # as the comparison's
    assert "## Ranking, pooled: 2 comparisons on the same samples" in text
    assert (tmp_path / "report" / "ranking_auc.png").read_bytes()[:4] == b"\x89PNG"
    cfg = load_config(TINY, {"home": str(home)}).resolved()
    children = {r["name"] for r in tracking.runs_of(cfg) if r["tags"].get("mlflow.parentRunId") == out["mlflow_run_id"]}
    assert {"evaluate-embeddings", "evaluate-judge", "evaluate-quantizer", "rank-din", "rank-ours_sid"} <= children
    # the report folder is a qarm output now: another evaluate refuses it before any work unless told
    assert (tmp_path / "report" / ".qarm-output.json").is_file()
    with pytest.raises(DataError, match=r"\[stage=evaluate, dataset=out\].*pass --overwrite"):
        evaluate(TINY, {"home": str(home)}, rank=False, out_dir=str(tmp_path / "report"))
