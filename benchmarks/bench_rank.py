"""Ranking-stage benchmarks and the ML-100K model comparison.

    .venv/bin/python benchmarks/bench_rank.py                       # throughput + GSU at 1M users
    .venv/bin/python benchmarks/bench_rank.py --users 100000        # a smaller GSU scale run
    .venv/bin/python benchmarks/bench_rank.py --experiment          # + AUC/GAUC of all models, 3 seeds

Phases run in child processes (benchmarks/harness.py), so each peak RSS is the phase's own:

* ``throughput``: ML-100K samples, item embeddings from MiniLM (all-MiniLM-L6-v2 over "title (year),
  genres: ...", PCA to 64 for the GSU) and SIDs from qarm_core.quantize (levels 32 x 16, FSQ 2 dims x
  4 levels); GSU retrievals/s (L = 500, k = 50) by both exact routes, and training samples/s of each
  model (one epoch, one seed).
* ``gsu_scale``: GSU over ``--users`` users x 1,000-item histories (synthetic, seeded, made chunk by
  chunk) against a 100k-item catalog of 64-d vectors, top-50, in chunks of 1,024 users: time, peak RSS.
* ``experiment``: every model x seeds 0, 1, 2 on ML-100K with the same inputs; the comparison table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import REPO, loadavg, run_phase, table  # noqa: E402

INPUTS = REPO / ".cache" / "rank" / "ml100k_minilm"


def _ml100k(cfg_over: dict | None = None, models: list[str] | None = None):
    import pyarrow.parquet as pq

    from qarm_core.base import DuckDBConfig
    from qarm_core.ingest import fetch_recbole_wheel, read_ml100k
    from qarm_core.rank.config import RankConfig
    from qarm_core.rank.inputs import minilm_inputs
    from qarm_core.rank.pipeline import build, load_item_inputs, prepare_data

    inter, items = read_ml100k(fetch_recbole_wheel(REPO / ".cache" / "recbole"))
    if not (INPUTS / "codes.parquet").exists():
        minilm_inputs(items, INPUTS)
    from qarm_core.split import SplitConfig, resolve_cutoffs

    cfg = RankConfig.model_validate(cfg_over or {})
    # the pipeline's default split (80 / 10 / 10 by event time), as configs/ml100k.yaml sets it
    cut = resolve_cutoffs(inter["ts"].to_numpy(), SplitConfig())
    index, samples = build(inter, items, cfg, DuckDBConfig(), REPO / ".cache" / "rank" / "duckdb", cut)
    inputs = load_item_inputs(INPUTS / "embeddings.parquet", INPUTS / "codes.parquet")
    codes = pq.read_table(INPUTS / "codes.parquet")
    t0 = time.perf_counter()
    data = prepare_data(samples, index, inputs, items, cfg, models)
    return cfg, samples, data, time.perf_counter() - t0, codes


def phase_throughput(epochs: int = 1) -> dict:
    import torch

    from qarm_core.rank import gsu as G
    from qarm_core.rank.config import ALL_MODELS
    from qarm_core.rank.inputs import pca
    from qarm_core.rank.train import train_model

    torch.set_num_threads(1)
    cfg, samples, data, prep_s, _ = _ml100k({"train": {"epochs": epochs, "seeds": [0]}})
    out: dict = {"samples.train": len(data.train_rows), "samples.test": len(data.test_rows), "prepare_s": prep_s}
    from qarm_core.quantize.io import read_embeddings
    from qarm_core.rank.inputs import align_embeddings

    ids, x = read_embeddings(INPUTS / "embeddings.parquet")
    vecs = pca(align_embeddings(data.index, ids, x)[0], 64)
    n = len(data.target)
    hist = lambda rows: data.history(rows, 500)          # noqa: E731
    for route, budget in (("table", 256 << 20), ("gather", 0)):
        t0 = time.perf_counter()
        G.search_samples(data.target, hist, 50, 4096, item_vecs=vecs, table_budget_bytes=budget)
        out[f"gsu.{route}.retrievals_per_s"] = n / (time.perf_counter() - t0)
    for m in ALL_MODELS:
        r = train_model(m, data, cfg, 0)
        out[f"train.{m}.samples_per_s"] = r.train_samples_per_s
        out[f"train.{m}.valid_auc_epoch1"] = r.valid_metrics["auc"]
    return out


def phase_gsu_scale(users: int = 1_000_000, hist_len: int = 1000, n_items: int = 100_000, dim: int = 64,
                    k: int = 50, chunk: int = 1024, seed: int = 0, table_budget_mb: int = 256) -> dict:
    import numpy as np
    import torch

    from qarm_core.quantize.io import synthetic_embeddings
    from qarm_core.rank import gsu as G

    torch.set_num_threads(2)
    _, x = next(synthetic_embeddings(n_items, dim, clusters=256, seed=seed, block=n_items))
    vecs = np.vstack([np.zeros((1, dim), np.float32), x])
    targets = np.random.default_rng([seed, 1]).integers(1, n_items + 1, users)

    def histories(rows: slice) -> np.ndarray:
        # Seeded per chunk, made on demand: the full 1M x 1,000 history matrix never exists.
        return np.random.default_rng([seed, 2, rows.start]).integers(1, n_items + 1, (rows.stop - rows.start, hist_len))

    t0 = time.perf_counter()
    # The result (users x k int32, 200 MB at 1M users) is the only thing that grows with the users.
    out = G.search_samples(targets, histories, k, chunk, item_vecs=vecs, table_budget_bytes=table_budget_mb << 20)
    dt = time.perf_counter() - t0
    # Time to make the histories alone (subtracted nowhere; reported so the GSU share is visible).
    t1 = time.perf_counter()
    for lo in range(0, min(users, 50 * chunk), chunk):
        histories(slice(lo, min(users, lo + chunk)))
    gen_per_chunk = (time.perf_counter() - t1) / len(range(0, min(users, 50 * chunk), chunk))
    route = "table" if chunk * (n_items + 1) * 4 <= table_budget_mb << 20 else "gather"
    return {"users": users, "hist_len": hist_len, "n_items": n_items, "dim": dim, "k": k, "chunk": chunk, "route": route,
            "seconds": dt, "retrievals_per_s": users / dt, "history_gen_s_est": gen_per_chunk * users / chunk,
            "result_rows": int(len(out))}


def phase_experiment(epochs: int = 3, seeds: list[int] | None = None) -> dict:
    import torch

    from qarm_core.rank.compare import compare

    torch.set_num_threads(1)
    cfg, samples, data, prep_s, codes = _ml100k({"train": {"epochs": epochs, "seeds": seeds or [0, 1, 2]}})
    t0 = time.perf_counter()
    c = compare(data, cfg)
    return {"table": c.table, "curves": c.curves, "report": samples.report | data.report,
            "prepare_s": prep_s, "train_s": time.perf_counter() - t0,
            "config": cfg.model_dump(mode="json")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--experiment", action="store_true")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=str, default=None, help="Write the raw results as JSON here.")
    args = ap.parse_args()
    from benchmarks.harness import machine

    print(f"# {machine()}", flush=True)
    me = "benchmarks.bench_rank"
    results: dict = {}
    print(f"# bench_rank ({loadavg()} at start)\n")
    from qarm_core.rank.config import ALL_MODELS

    if not args.skip_throughput:
        r = run_phase(f"{me}:phase_throughput")
        results["throughput"] = r
        print(f"## Throughput on ML-100K ({r['samples.train']:,} train / {r['samples.test']:,} test samples), "
              f"1 thread, {loadavg()}\n")
        rows = [["GSU, score-table route (L=500, k=50, d=64)", f"{r['gsu.table.retrievals_per_s']:,.0f} retrievals/s"],
                ["GSU, gathered-vectors route", f"{r['gsu.gather.retrievals_per_s']:,.0f} retrievals/s"]]
        rows += [[f"train {m}", f"{r[f'train.{m}.samples_per_s']:,.0f} samples/s"]
                 for m in ALL_MODELS]
        print(table(["what", "measured"], rows) + f"\n\npeak RSS {r['peak_rss_gib']:.2f} GiB, "
              f"wall {r['wall_seconds']:.0f} s\n")
    if not args.skip_scale:
        r = run_phase(f"{me}:phase_gsu_scale", users=args.users)
        results["gsu_scale"] = r
        print(f"## GSU at scale, 2 threads, {loadavg()}\n")
        print(table(["users", "history", "catalog", "d", "k", "chunk", "seconds", "retrievals/s",
                     "history generation (est. s)", "peak RSS GiB"],
                    [[f"{r['users']:,}", f"{r['hist_len']:,}", f"{r['n_items']:,}", r["dim"], r["k"], r["chunk"],
                      f"{r['seconds']:.1f}", f"{r['retrievals_per_s']:,.0f}", f"{r['history_gen_s_est']:.1f}",
                      f"{r['peak_rss_gib']:.2f}"]]) + "\n")
    if args.experiment:
        from qarm_core.rank.compare import TABLE_HEADERS, format_table

        r = run_phase(f"{me}:phase_experiment", epochs=args.epochs)
        results["experiment"] = r
        print(f"## ML-100K: all models, seeds 0/1/2 (init + negatives), lr from the grid and epoch (<= "
              f"{args.epochs}) chosen on validation, test reported, MiniLM embeddings + SIDs, {loadavg()}\n")
        print(table(TABLE_HEADERS + ["AUC per seed"],
                    [row + [", ".join(f"{a:.4f}" for a in t["auc_per_seed"])]
                     for row, t in zip(format_table(r["table"]), r["table"])]))
        print(f"\nsamples: {json.dumps(r['report'])}\ntrain {r['train_s']:.0f} s, "
              f"wall {r['wall_seconds']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
