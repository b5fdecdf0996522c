"""The rank-train flow on the tiny config under prefect_test_harness, with real MLflow in tmp."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.rank_train import rank_train
from qarm_core.rank.compare import load_comparison_scores, pool_comparisons
from qarm_core.rank.config import ALL_MODELS
from qarm_core.config import load_config
from qarm_core.errors import DataError, GateError
from qarm_core.ingest import resolve_source
from qarm_core.quantize.io import embeddings_batch
from qarm_core.schemas import CODES, SCHEMAS, embeddings_schema
from qarm_core.split import split_events
from qarm_core.storage import Storage, read_dataset, write_parquet_dataset, write_stage_outputs
from tasks import tracking
from tests.support.paths import TINY

# Small and fast: 2 epochs, 2 seeds, short histories.
RANK = {"rank.samples.long_len": 30, "rank.samples.short_len": 5, "rank.train.lr_grid": [3e-3, 1e-2],
        "rank.gsu.top_k": 8, "rank.gsu.pca_dim": 8, "rank.model.dim": 8, "rank.model.att_hidden": 8,
        "rank.model.mlp_hidden": [16], "rank.model.vq_neighbours": 3, "rank.train.epochs": 2,
        "rank.train.seeds": [0, 1], "rank.train.batch_size": 128}


def _publish_log(home: Path, with_item_inputs: bool, with_codes: bool = True,
                 meta: dict | None = None) -> tuple[Path, Path]:
    """Publish the tiny synthetic log (and, optionally, embeddings [+ codes] for it) as a snapshot
    (with ``meta``, as a refresh publishes it); returns the embeddings and codes files too."""
    cfg = load_config(TINY, {"home": str(home)}).resolved()
    st = Storage(home).ensure()
    _, batches = resolve_source(cfg.ingest)
    records, _, _ = write_stage_outputs(st, "ingest", "t", {n: (SCHEMAS[n], fn) for n, fn in batches.items()})
    tables, _ = split_events(read_dataset(records["interactions"]), cfg.split)
    records["periods"] = write_parquet_dataset(home / "in" / "periods", tables["periods"].to_batches(),
                                               SCHEMAS["periods"])
    ids = np.sort(read_dataset(records["items"])["item_id"].to_numpy())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(ids), 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    from qarm_core.quantize.quantizer import QuantizerParams, quantize_embeddings

    _, codes, _ = quantize_embeddings(x.copy(), ids, QuantizerParams(levels=(4, 4), fsq_dims=2, fsq_levels=2))
    emb_file, codes_file = home / "in" / "emb.parquet", home / "in" / "codes.parquet"
    emb_file.parent.mkdir(parents=True, exist_ok=True)
    emb = pa.Table.from_batches([embeddings_batch(ids, x, "test")])
    pq.write_table(emb, emb_file)
    pq.write_table(codes, codes_file)
    if with_item_inputs:
        records["embeddings"] = write_parquet_dataset(home / "in" / "embeddings", emb.to_batches(), embeddings_schema(16))
        if with_codes:
            records["codes"] = write_parquet_dataset(home / "in" / "codes", codes.cast(CODES.schema).to_batches(),
                                                     CODES)
    st.publish(records, meta=meta)
    return emb_file, codes_file


@pytest.mark.slow
def test_rank_train_flow_logs_one_run_per_model(prefect_harness, tmp_path):
    home = tmp_path / "home"
    cfg = load_config(TINY, {"home": str(home)}).resolved()
    with tracking.flow_run(cfg, "codebook-refresh") as refresh_run:      # the run that "published" the snapshot
        pass
    _publish_log(home, with_item_inputs=True, meta={"mlflow_run_id": refresh_run})
    out = rank_train(TINY, {"home": str(home), "tracking.plots": True, **RANK})
    models = list(ALL_MODELS)
    assert [r["model"] for r in out["table"]] == models
    for row in out["table"]:
        assert row["seeds"] == 2 and row["lr"] in (3e-3, 1e-2) and set(row["valid_auc_by_lr"]) == {"0.003", "0.01"}
        assert (row["vs_ref"] is None) == (row["model"] == row["reference"])
        # per test-user group; a group lacking a class has no AUC and is left out
        assert set(row["by_history"]) <= {"with_history", "without_history"}
        for g in row["by_history"].values():
            assert g["users"] > 0 and 0.0 <= g["auc_mean"] <= 1.0
            assert (g["vs_ref"] is None) == (row["model"] == row["reference"])
    assert out["inputs"]["embeddings"].startswith("snapshot:") and out["samples"]["test.samples"] > 0
    runs = tracking.runs_of(cfg)
    children = {r["name"]: r for r in runs if r["tags"].get("mlflow.parentRunId") == out["mlflow_run_id"]}
    assert {f"rank-{m}" for m in models} | {"rank-samples", "gate-rank-rank_samples"} <= set(children)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.tracking_uri)
    for m in models:
        r = children[f"rank-{m}"]
        assert r["status"] == "FINISHED"
        assert {"auc", "auc_std", "gauc", "gauc_std", "logloss"} <= set(r["metrics"])
        assert r["params"]["model"] == m and r["params"]["rank.train.epochs"] == "2"
        hist = client.get_metric_history(r["run_id"], "lr0.01.seed1.valid_auc")
        assert [h.step for h in hist] == [1, 2]
        assert r["params"]["lr_chosen"] in ("0.003", "0.01") and "valid_auc" in r["metrics"]
        arts = [a.path for a in client.list_artifacts(r["run_id"], "curves")]
        assert arts == [f"curves/curves_{m}.png"]
    png = client.download_artifacts(out["mlflow_run_id"], "curves/curves_all.png", str(tmp_path))
    assert Path(png).read_bytes()[:4] == b"\x89PNG"
    assert children["gate-rank-rank_samples"]["metrics"]["gate.rank_samples.success"] == 1.0
    # the refresh whose snapshot was ranked gets each model's test AUC/GAUC and the AUC plot
    refresh = client.get_run(refresh_run).data.metrics
    assert {r["model"]: (r["auc_mean"], r["gauc_mean"]) for r in out["table"]} == \
        {m: (refresh[f"rank.{m}.auc"], refresh[f"rank.{m}.gauc"]) for m in models}
    assert [a.path for a in client.list_artifacts(refresh_run, "plots")] == ["plots/ranking_auc.png"]
    # every chosen run's test scores: pooling this comparison alone gives back its own differences,
    # and `qarm rank pool` reads the artifact (twice: the same comparison pools with itself)
    npz = client.download_artifacts(out["mlflow_run_id"], "rank/test_scores.npz", str(tmp_path))
    with np.load(npz, allow_pickle=False) as z:
        scores = load_comparison_scores(z)
    assert list(scores.runs) == models and scores.reference == out["table"][0]["reference"]
    ref, pooled = pool_comparisons([scores], n_boot=1000)
    for row, p in zip(out["table"], pooled):
        assert p["model"] == row["model"] and p["runs"] == 2
        assert p["auc_mean"] == pytest.approx(row["auc_mean"], abs=1e-6)
        if row["vs_ref"] is not None:
            assert p["vs_ref"]["diff"] == pytest.approx(row["vs_ref"]["diff"], abs=1e-6)
    from typer.testing import CliRunner

    from flows.rank_cli import app

    res = CliRunner().invoke(app, ["pool", npz, npz, "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    assert "2 comparisons pooled" in res.output and "reference" in res.output
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    res = CliRunner().invoke(app, ["pool", str(bad)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1            # one line, however long
    assert f"dataset={bad}]" in res.output and "not a comparison's test scores" in res.output

    # --pool-with: a file that is not a comparison's scores, or scores of other samples (labels
    # flipped), is refused before any model trains
    def din_runs() -> int:
        return sum(r["name"] == "rank-din" for r in tracking.runs_of(cfg))

    with pytest.raises(DataError, match=rf"\[stage=rank, dataset={bad}\] --pool-with: not a comparison's test scores"):
        rank_train(TINY, {"home": str(home), **RANK}, models=["din"], pool_with=[str(bad)])
    with np.load(npz, allow_pickle=False) as z:
        arrays = dict(z)
    arrays["label"] = 1 - arrays["label"]
    flipped = tmp_path / "flipped.npz"
    np.savez(flipped, **arrays)
    before = din_runs()
    with pytest.raises(DataError, match=rf"\[stage=rank, dataset={flipped}\] --pool-with: .*other ranking samples"):
        rank_train(TINY, {"home": str(home), **RANK}, models=["din"], pool_with=[str(flipped)])
    assert din_runs() == before
    # a rerun reuses the staged samples; pooled with the first comparison: DIN's runs of both
    again = rank_train(TINY, {"home": str(home), **RANK}, models=["din"], pool_with=[npz])
    assert [r["model"] for r in again["table"]] == ["din"]
    reused = sorted(r["metrics"]["reused"] for r in tracking.runs_of(cfg) if r["name"] == "rank-samples")
    assert reused == [0.0, 1.0, 1.0]
    pooled = again["pooled"]
    assert pooled["error"] is None and pooled["comparisons"] == 2 and pooled["sources"] == ["this run", npz]
    assert [(r["model"], r["runs"], r["vs_ref"]) for r in pooled["rows"]] == [("din", 4, None)]
    first_din = next(r for r in out["table"] if r["model"] == "din")
    # the mean over both comparisons' runs
    assert pooled["rows"][0]["auc_mean"] == pytest.approx((first_din["auc_mean"] + again["table"][0]["auc_mean"]) / 2,
                                                          abs=1e-6)
    assert client.get_run(again["mlflow_run_id"]).data.metrics["pooled.din.auc"] == pooled["rows"][0]["auc_mean"]


def test_rank_train_needs_item_inputs_or_explicit_paths(prefect_harness, tmp_path):
    home = tmp_path / "home"
    emb_file, codes_file = _publish_log(home, with_item_inputs=False)
    with pytest.raises(DataError, match=r"(?s)\[stage=rank, dataset=embeddings\].*need embeddings and codes.*"
                                        r"--embeddings/--codes"):
        rank_train(TINY, {"home": str(home), **RANK})
    # DIN alone needs neither
    out = rank_train(TINY, {"home": str(home), **RANK}, models=["din"])
    assert out["inputs"] == {}
    out = rank_train(TINY, {"home": str(home), **RANK}, models=["ours_sid"], embeddings_path=str(emb_file),
                     codes_path=str(codes_file))
    assert out["inputs"] == {"embeddings": "path", "codes": "path"} and out["table"][0]["model"] == "ours_sid"


def test_rank_train_without_snapshot_and_failing_gate(prefect_harness, tmp_path):
    with pytest.raises(DataError, match=r"no published snapshot.*qarm refresh"):
        rank_train(TINY, {"home": str(tmp_path / "empty"), **RANK}, models=["din"])
    home = tmp_path / "home"
    _publish_log(home, with_item_inputs=False)
    with pytest.raises(GateError, match=r"(?s)dataset=rank_samples.*expect_train_samples_to_be_at_least"):
        rank_train(TINY, {"home": str(home), **RANK, "rank.gate.min_train_samples": 10_000_000}, models=["din"])


@pytest.mark.slow
def test_rank_cli_train_and_compare(prefect_harness, tmp_path):
    from typer.testing import CliRunner

    from flows.rank_cli import app

    home = tmp_path / "home"
    emb_file, codes_file = _publish_log(home, with_item_inputs=False)
    sets = [a for k, v in {"home": str(home), **RANK}.items()
            for a in ("--set", f"{k}={v if not isinstance(v, list) else '[' + ','.join(map(str, v)) + ']'}")]
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--model", "din", "--config", TINY, *sets])
    assert res.exit_code == 0, res.output
    assert "din" in res.output and "±" in res.output and "mlflow" in res.output
    res = runner.invoke(app, ["compare", "--config", TINY, *sets, "-m", "din", "-m", "ours_sid",
                              "--embeddings", str(emb_file), "--codes", str(codes_file)])
    assert res.exit_code == 0, res.output
    assert "ours_sid" in res.output and "ΔAUC" in res.output
    res = runner.invoke(app, ["compare", "--config", TINY, *sets, "-m", "ours_sid"])
    assert res.exit_code == 2 and "stage=rank, dataset=embeddings" in res.output
    res = runner.invoke(app, ["train", "--model", "nope", "--config", TINY, *sets])
    assert res.exit_code == 2 and "unknown model" in res.output


def test_rank_train_minilm_fallback(prefect_harness, tmp_path):
    """rank.inputs_fallback: minilm embeds the catalog with MiniLM and quantizes it inside the flow,
    stages the result and reuses it on the next run."""
    home = tmp_path / "home"
    _publish_log(home, with_item_inputs=False)
    over = {"home": str(home), **RANK, "rank.inputs_fallback": "minilm", "rank.train.seeds": [0],
            "rank.train.epochs": 1}
    out = rank_train(TINY, over, models=["ours_sid"])
    assert out["inputs"] == {"embeddings": "fallback:minilm", "codes": "fallback:minilm"}
    staged = list((home / "work" / "rank-inputs").glob("*/embeddings/*.parquet"))
    assert len(staged) == 1
    vec = pq.read_table(staged[0])["vector"]
    assert vec.type.list_size == 384
    rank_train(TINY, over, models=["ours_sid"])
    assert list((home / "work" / "rank-inputs").glob("*/embeddings/*.parquet")) == staged
    # published embeddings without codes: the codes are quantized from those embeddings
    home2 = tmp_path / "home2"
    _publish_log(home2, with_item_inputs=True, with_codes=False)
    out = rank_train(TINY, {**over, "home": str(home2)}, models=["ours_sid"])
    assert out["inputs"]["embeddings"].startswith("snapshot:") and out["inputs"]["codes"] == "fallback:quantized"
    assert not list((home2 / "work" / "rank-inputs").glob("*/embeddings"))
