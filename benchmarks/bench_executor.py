"""Benchmark of ``executor``: catalog embedding and judge scoring on 1 and 2 Dask workers (one
thread each, float32) against the in-process run, on ML-100K with the default model (SmolLM2-135M),
on this CPU; then the projected time of a 10M-item catalog embedding, with the arithmetic.

Each configuration runs inside a Prefect flow through the pipeline's own path
(``tasks.executor.flow_cluster`` + ``shard_runner``: each shard a Prefect task run on a Dask
worker holding its own model replica). Each is timed twice: cold (the cluster's workers start and
load the model in their first shard) and warm (the same cluster again, models loaded). Rates are
the warm pass's. Both passes compute the same shards; the table says whether the workers' vectors
equal the in-process run's.

    python benchmarks/bench_executor.py [--items 800] [--pairs 320] [--shards 8]
                                        [--gpu-items-per-s 10000 --gpus 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CATALOG = 10_000_000


def _ml100k(n_items: int, n_pairs: int):
    """(the first ``n_items`` ML-100K items, ``n_pairs`` Swing pairs among them)."""
    import pyarrow.compute as pc

    from qarm_core.ingest import fetch_recbole_wheel, read_ml100k
    from qarm_core.pairs.swing import mine_swing_pairs

    inter, items = read_ml100k(fetch_recbole_wheel(REPO / ".cache" / "recbole"))
    items = items.sort_by("item_id").slice(0, n_items)
    inter = inter.filter(pc.is_in(inter["item_id"], items["item_id"]))
    inter = inter.filter(pc.greater_equal(inter["rating"], 4))
    pairs = mine_swing_pairs(inter["user_id"].to_numpy(), inter["item_id"].to_numpy())
    return items, pairs.slice(0, n_pairs)


def _run(kind: str, workers: int, items, pairs, shards: int, out: Path) -> dict:
    """Embed ``items`` and score ``pairs`` twice (cold, warm) on the given executor, in a flow."""
    from prefect import flow

    from qarm_core.config import PipelineConfig
    from qarm_core.embed.config import EmbedConfig, EmbedModelConfig
    from qarm_core.embed.embed import embed_catalog
    from qarm_core.judge.config import JudgeConfig
    from qarm_core.judge.judge import make_scorer, pair_components
    from qarm_core.quantize.io import read_embeddings
    from tasks.executor import flow_cluster, shard_runner

    cfg = PipelineConfig.model_validate({"home": str(out / "home"),
                                         "executor": {"kind": kind, "workers": workers, "threads_per_worker": 1}})
    ecfg = EmbedConfig(dtype="float32", chunk_rows=-(-items.num_rows // shards), base_pooling="emb")
    mcfg = EmbedModelConfig()
    jcfg = JudgeConfig.model_validate({"local": {"dtype": "float32",
                                                 "shard_requests": -(-pairs.num_rows // shards)}})

    @flow(name=f"bench-executor-{kind}-{workers}")
    def bench() -> dict:
        res: dict = {}
        with flow_cluster(cfg):
            for p in ("cold", "warm"):
                with shard_runner(cfg) as runner:
                    t0 = time.perf_counter()
                    rec = embed_catalog(items, out / f"emb-{p}", mcfg, ecfg, shards=runner)
                    res[f"embed_{p}_s"] = time.perf_counter() - t0
                    res["workers_used"] = rec.workers
                    scorer = make_scorer(jcfg, shards=runner)     # the driver's copy loads outside the timing
                    t0 = time.perf_counter()
                    parts = pair_components(pairs, items, scorer)
                    res[f"judge_{p}_s"] = time.perf_counter() - t0
        res["vectors"] = read_embeddings(out / "emb-warm")[1].tolist()
        res["pmi"] = parts["pmi"].tolist()
        return res

    return bench()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=800)
    ap.add_argument("--pairs", type=int, default=320)
    ap.add_argument("--shards", type=int, default=8, help="shards per stage (parts of the catalog, runs of pairs)")
    # one H200, benchmarks/gpu_smoke.sh 2026-12-04 (SmolLM2-135M, batch 512, bf16; README "GPU hosts")
    ap.add_argument("--gpu-items-per-s", type=float, default=6_513.0,
                    help="catalog-embedding rate of one GPU for the projection (default: measured on one H200 "
                         "by benchmarks/gpu_smoke.sh; a GPU host's own figure replaces it)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from benchmarks.harness import machine, table

    torch.set_num_threads(2)
    items, pairs = _ml100k(args.items, args.pairs)
    rows, res = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_executor-"))
    try:
        for name, kind, workers in (("in-process (2 threads)", "local", 1), ("dask, 1 worker x 1 thread", "dask", 1),
                                    ("dask, 2 workers x 1 thread", "dask", 2)):
            r = _run(kind, workers, items, pairs, args.shards, tmp / f"{kind}{workers}")
            res[name] = r
            print(f"{name}: embed {r['embed_warm_s']:.1f} s, judge {r['judge_warm_s']:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    local = res["in-process (2 threads)"]
    one = res["dask, 1 worker x 1 thread"]
    for name, r in res.items():
        same_x = np.abs(np.asarray(r["vectors"]) - np.asarray(local["vectors"])).max()
        same_p = np.abs(np.asarray(r["pmi"]) - np.asarray(local["pmi"])).max()
        rows.append([name, f"{r['embed_cold_s']:.1f}", f"{r['embed_warm_s']:.1f}",
                     f"{items.num_rows / r['embed_warm_s']:.1f}", f"{one['embed_warm_s'] / r['embed_warm_s']:.2f}x",
                     f"{r['judge_cold_s']:.1f}", f"{r['judge_warm_s']:.1f}", f"{pairs.num_rows / r['judge_warm_s']:.1f}",
                     f"{one['judge_warm_s'] / r['judge_warm_s']:.2f}x", f"{same_x:.1e} / {same_p:.1e}"])
    print(f"\n{machine()}")
    print(f"ML-100K: {items.num_rows} items embedded (SmolLM2-135M, EMB path), {pairs.num_rows} Swing pairs "
          f"scored (judge PMI + MiniLM terms), float32, {args.shards} shards per stage\n")
    print(table(["executor", "embed cold s", "embed warm s", "items/s", "vs 1 worker", "judge cold s",
                 "judge warm s", "pairs/s", "vs 1 worker", "max |diff| vs in-process (vectors / PMI)"], rows))
    two = res["dask, 2 workers x 1 thread"]
    rate2 = items.num_rows / two["embed_warm_s"]
    eff = (one["embed_warm_s"] / two["embed_warm_s"]) / 2
    gpu_rate = args.gpu_items_per_s * args.gpus * eff
    print(f"\nProjection, catalog embedding of {CATALOG:,} items:")
    print(f"- this box, 2 workers: {CATALOG:,} / {rate2:.1f} items/s = {CATALOG / rate2 / 3600:.1f} h (measured rate)")
    print(f"- {args.gpus} GPUs at {args.gpu_items_per_s:,.0f} items/s each (--gpu-items-per-s: measured by "
          f"gpu_smoke.sh on one GPU, not in this run; 8 GPUs never measured), scaling efficiency {eff:.2f} (measured here, 2 vs 1 "
          f"worker): {CATALOG:,} / ({args.gpu_items_per_s:,.0f} x {args.gpus} x {eff:.2f}) = "
          f"{CATALOG / gpu_rate / 60:.1f} min")
    out = {name: {k: v for k, v in r.items() if k not in ("vectors", "pmi")} for name, r in res.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
