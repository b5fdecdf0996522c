"""Benchmark: Semantic-ID quantisation of 10M x 128 synthetic embeddings, end to end.

qarm (2 x 256 full-batch residual k-means + FSQ, assign all, codes -> Parquet) against its FLOP
floor (multiply-adds of fit and assignment / the sgemm rate measured in this run) and two baselines
at the same code space 256^3: faiss ResidualQuantizer (3 x 8 bits, trained on a subsample, encodes
all rows) and a mini-batch residual k-means in torch (3 x 256, Sculley-style per-centroid rates).
Each phase runs in its own process so its peak RSS is its own; every figure printed is measured in
this run. Goals checked (not asserted): qarm <= 10 minutes and <= 8 GiB peak RSS.

    python benchmarks/bench_quantize.py [--n 10000000 --dim 128 --skip-baselines]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 600.0
GOAL_RSS_GIB = 8.0
GIB = 2.0 ** 30


def _threads(threads: int) -> None:
    """Pin numpy/OpenBLAS, faiss (OpenMP) and torch to ``threads`` (env vars are set by the parent)."""
    try:
        import faiss
        faiss.omp_set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def generate(n: int, dim: int, seed: int):
    """(ids, x): the seeded mixture of Gaussians written block by block into one preallocated
    float32 array (no list of blocks + concatenate, which would hold two copies)."""
    import numpy as np

    from qarm_core.quantize.io import synthetic_embeddings

    x = np.empty((n, dim), np.float32)
    for ids, block in synthetic_embeddings(n, dim, seed=seed):
        x[ids[0]:ids[0] + len(ids)] = block
    return np.arange(n, dtype=np.int64), x


# --------------------------------------------------------------------------------------------- phases

def phase_sgemm(threads: int, seconds: float = 3.0) -> dict:
    """float32 GEMM rate of numpy's BLAS: (8192 x 128) @ (128 x 4096), best of 5 timed windows."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8192, 128), dtype=np.float32)
    b = rng.standard_normal((128, 4096), dtype=np.float32)
    c = np.empty((8192, 4096), np.float32)
    flop = 2.0 * 8192 * 128 * 4096
    for _ in range(3):
        np.matmul(a, b, out=c)                           # warm up (threads, pages)
    rates = []
    for _ in range(5):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            np.matmul(a, b, out=c)
            reps += 1
        rates.append(reps * flop / (time.perf_counter() - t0) / 1e9)
    # For reference (not the floor): what faiss's IndexFlatL2 search, qarm's assignment kernel,
    # reaches on the same shapes as one k-means pass (200k rows x K=256, d=128).
    import faiss

    _threads(threads)
    xq = rng.standard_normal((200_000, 128), dtype=np.float32)
    index = faiss.IndexFlatL2(128)
    index.add(rng.standard_normal((256, 128), dtype=np.float32))
    index.search(xq[:20_000], 1)
    t0 = time.perf_counter()
    index.search(xq, 1)
    faiss_gflops = 2.0 * 200_000 * 256 * 128 / (time.perf_counter() - t0) / 1e9
    return {"gflops": max(rates), "gflops_median": float(np.median(rates)), "threads": threads,
            "shape": "(8192x128)@(128x4096) float32", "faiss_search_gflops": faiss_gflops}


def phase_qarm(n: int, dim: int, levels: list[int], fsq_dims: int, fsq_levels: int, seed: int,
               threads: int) -> dict:
    import pyarrow.parquet as pq

    from qarm_core.quantize.quantizer import QuantizerParams, quantize_embeddings

    _threads(threads)
    t0 = time.perf_counter()
    ids, x = generate(n, dim, seed)
    gen_seconds = time.perf_counter() - t0
    gen_rss = _peak_rss_gib()
    x_gib = x.nbytes / GIB
    params = QuantizerParams(levels=tuple(levels), fsq_dims=fsq_dims, fsq_levels=fsq_levels, seed=seed)
    with tempfile.TemporaryDirectory(prefix="bench_quantize_") as tmp:
        t0 = time.perf_counter()
        codebook, table, m = quantize_embeddings(x, ids, params, inplace=True)
        t_quant = time.perf_counter() - t0
        path = Path(tmp) / "codes.parquet"
        pq.write_table(table, path, compression="zstd")
        seconds = time.perf_counter() - t0
        parquet_bytes = path.stat().st_size
    rows = table.num_rows
    return {"seconds": seconds, "gen_seconds": gen_seconds, "gen_peak_rss_gib": gen_rss, "x_gib": x_gib,
            "quantize_seconds": t_quant, "fit_seconds": m["fit_seconds"], "parquet_seconds": seconds - t_quant,
            "parquet_mib": parquet_bytes / 2 ** 20, "rows": rows,
            "mse": m["level3.mse"], "mse_levels": [m["level1.mse"], m["level2.mse"], m["level3.mse"]],
            "collision": m["raw.collision_rate"], "edge_num": m["raw.edge_num"], "hr1": m["raw.hr@1"],
            "resolved_collision": m["resolved.collision_rate"],
            "fit_report": codebook.fit_report, "niter": params.niter, "polish_iter": params.polish_iter,
            "fsq_sample": min(n, _fsq_sample_default())}


def _fsq_sample_default() -> int:
    """Rows fit_fsq estimates its projection on (its ``sample`` default, read, not copied)."""
    import inspect

    from qarm_core.quantize.fsq import fit_fsq

    return int(inspect.signature(fit_fsq).parameters["sample"].default)


def phase_faiss_rq(n: int, dim: int, seed: int, threads: int, train: int, beam: int,
                   chunk: int = 100_000) -> dict:
    import faiss
    import numpy as np

    from qarm_core.quantize.metrics import collision_metrics

    _threads(threads)
    t0 = time.perf_counter()
    _, x = generate(n, dim, seed)
    gen_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    rq = faiss.ResidualQuantizer(dim, 3, 8)                  # 3 levels x 256 = code space 2^24
    rq.max_beam_size = beam
    m = min(train, n)
    rows = np.sort(np.random.default_rng(seed).choice(n, m, replace=False)) if m < n else slice(None)
    xt = np.ascontiguousarray(x[rows])
    rq.train(xt)
    del xt
    train_seconds = time.perf_counter() - t0
    keys = np.empty(n, np.int64)
    se = 0.0
    for lo in range(0, n, chunk):
        part = x[lo:lo + chunk]
        codes = rq.compute_codes(part)                        # (rows, 3) uint8: one byte per level
        keys[lo:lo + chunk] = (codes[:, 0].astype(np.int64) | codes[:, 1].astype(np.int64) << 8
                               | codes[:, 2].astype(np.int64) << 16)
        se += float(((part - rq.decode(codes)) ** 2).sum(dtype=np.float64))
    seconds = time.perf_counter() - t0
    col = collision_metrics(keys)
    return {"seconds": seconds, "gen_seconds": gen_seconds, "train_seconds": train_seconds, "train_rows": m,
            "beam": beam, "mse": se / n, "collision": col["collision_rate"], "edge_num": col["edge_num"]}


def phase_torch_mb(n: int, dim: int, seed: int, threads: int, k: int = 256, n_levels: int = 3,
                   batch: int = 65536, steps: int = 200, chunk: int = 262_144) -> dict:
    """Residual mini-batch k-means (Sculley 2010): per level, init from random rows, ``steps``
    mini-batches with per-centroid learning rate 1/count, then assign all rows and subtract."""
    import numpy as np
    import torch

    from qarm_core.quantize.metrics import collision_metrics

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    _, x_np = generate(n, dim, seed)
    gen_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    x = torch.from_numpy(x_np)                                 # shares memory: x becomes the residual
    g = torch.Generator().manual_seed(seed)
    keys = torch.zeros(n, dtype=torch.int64)
    mse_levels = []
    for level in range(n_levels):
        c = x[torch.randperm(n, generator=g)[:k]].clone()
        counts = torch.zeros(k, dtype=torch.float64)
        for _ in range(steps):
            xb = x[torch.randint(0, n, (min(batch, n),), generator=g)]
            lab = ((c * c).sum(1)[None, :] - 2.0 * xb @ c.T).argmin(1)
            b = torch.bincount(lab, minlength=k).to(torch.float64)
            s = torch.zeros(k, dim).index_add_(0, lab, xb).to(torch.float64)  # <= batch rows per sum
            new = counts + b
            hit = b > 0
            # c <- c + (sum_x - b c) / count: the per-point update with rate 1/count, applied to a batch
            c64 = c.to(torch.float64)
            c64[hit] += (s[hit] - b[hit, None] * c64[hit]) / new[hit, None]
            c, counts = c64.to(torch.float32), new
        cn = (c * c).sum(1)
        err = 0.0
        for lo in range(0, n, chunk):
            part = x[lo:lo + chunk]
            lab = (cn[None, :] - 2.0 * part @ c.T).argmin(1)
            part -= c[lab]                                     # in place on the shared numpy buffer
            err += float((part.to(torch.float64) ** 2).sum())
            keys[lo:lo + chunk] = keys[lo:lo + chunk] * k + lab
        mse_levels.append(err / n)
    seconds = time.perf_counter() - t0
    col = collision_metrics(keys.numpy())
    return {"seconds": seconds, "gen_seconds": gen_seconds, "steps": steps, "batch": batch,
            "mse": mse_levels[-1], "mse_levels": mse_levels, "collision": col["collision_rate"],
            "edge_num": col["edge_num"]}


def run_phase(name: str, threads: int, **kwargs) -> dict:
    """Run one phase in a child process (threads pinned); returns its result plus its own peak RSS."""
    code = (f"import json, resource, sys; sys.path.insert(0, {str(REPO)!r}); "
            f"import benchmarks.bench_quantize as b; "
            f"r = b.phase_{name}(**json.loads(sys.argv[1])); "
            f"r['peak_rss_gib'] = b._peak_rss_gib(); print(json.dumps(r))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps({**kwargs, "threads": threads})],
                          capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- FLOPs

def qarm_macs(n: int, d: int, levels: list[int], fsq_dims: int, q: dict) -> dict[str, float]:
    """Multiply-adds of qarm's fit and assignment (see the assumptions printed with the table).

    Per k-means level of K centroids:
      faiss fit:   niter assignment passes of n*K*d (faiss Clustering::train_encoded runs exactly
                   niter index.search calls over all n rows: max_points_per_centroid = n, no subsample)
                   + niter centroid updates of n*d;
      Lloyd:       1 initial assign + one assign per loop iteration run; the loop runs
                   `lloyd_iterations` accepted updates, plus one more (rejected) when it converged
                   before polish_iter, so assigns = 1 + it + converged; each loop iteration also
                   accumulates centroid sums (n*d);
      final assign (assign_sticky): n*K*d.
    FSQ: covariance of s = min(n, fit_fsq's sample) rows (s*d*d) + their projection (s*d*f) in the fit,
         and projection of all rows n*d*f.
    """
    macs = {"faiss_fit": 0.0, "lloyd": 0.0, "assign": 0.0, "fsq": 0.0}
    for k, rep in zip(levels, q["fit_report"]):
        it, conv = int(rep["lloyd_iterations"]), bool(rep["converged"])
        loops = it + int(conv)
        macs["faiss_fit"] += q["niter"] * (n * k * d + n * d)
        macs["lloyd"] += (1 + loops) * n * k * d + loops * n * d
        macs["assign"] += n * k * d
    s = q["fsq_sample"]
    macs["fsq"] = s * d * d + s * d * fsq_dims + n * d * fsq_dims
    return macs


# --------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--levels", default="256,256", help="K per residual k-means level")
    ap.add_argument("--fsq-dims", type=int, default=4)
    ap.add_argument("--fsq-levels", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-train", type=int, default=1_000_000,
                    help="rows the faiss ResidualQuantizer baseline is trained on (it encodes all n)")
    ap.add_argument("--rq-beam", type=int, default=5, help="ResidualQuantizer max_beam_size (faiss default 5)")
    ap.add_argument("--mb-steps", type=int, default=200, help="mini-batch steps per level (torch baseline)")
    ap.add_argument("--mb-batch", type=int, default=65536)
    ap.add_argument("--skip-baselines", action="store_true")
    args = ap.parse_args()
    levels = [int(v) for v in args.levels.split(",")]
    fsq_cells = args.fsq_levels ** args.fsq_dims
    space = fsq_cells
    for k in levels:
        space *= k

    g = run_phase("sgemm", args.threads)
    q = run_phase("qarm", args.threads, n=args.n, dim=args.dim, levels=levels, fsq_dims=args.fsq_dims,
                  fsq_levels=args.fsq_levels, seed=args.seed)
    rows = [(f"qarm {'+'.join(map(str, levels))} full batch + FSQ {fsq_cells}", q)]
    if not args.skip_baselines:
        if fsq_cells != 256 or levels != [256, 256]:
            print("note: baselines are 3 x 256 (2^24); qarm's code space here is", space)
        rq = run_phase("faiss_rq", args.threads, n=args.n, dim=args.dim, seed=args.seed,
                       train=args.baseline_train, beam=args.rq_beam)
        mb = run_phase("torch_mb", args.threads, n=args.n, dim=args.dim, seed=args.seed,
                       steps=args.mb_steps, batch=args.mb_batch)
        rows += [(f"faiss RQ 3x8 bits, beam {rq['beam']}", rq),
                 (f"torch mini-batch 3x256, {mb['steps']}x{mb['batch']}", mb)]

    n, d = args.n, args.dim
    macs = qarm_macs(n, d, levels, args.fsq_dims, q)
    total_macs = sum(macs.values())
    floor = 2.0 * total_macs / (g["gflops"] * 1e9)

    print(f"\nquantize {n:,} x {d} float32 synthetic embeddings (seeded mixture of Gaussians on the sphere, "
          f"x = {q['x_gib']:.2f} GiB), code space {space:,}; {args.threads} threads\n")
    w = 44
    print(f"| {'method':<{w}} | {'seconds':>8} | {'peak RSS GiB':>12} | {'MSE':>8} | {'raw collision':>13} | "
          f"{'EdgeNum':>7} |")
    print(f"|{'-' * (w + 2)}|{'-' * 10}|{'-' * 14}|{'-' * 10}|{'-' * 15}|{'-' * 9}|")
    for name, r in rows:
        print(f"| {name:<{w}} | {r['seconds']:>8.1f} | {r['peak_rss_gib']:>12.2f} | {r['mse']:>8.5f} | "
              f"{r['collision']:>13.4f} | {r['edge_num']:>7.3f} |")

    its = ", ".join(f"L{r['level']}: {r['lloyd_iterations']}{'' if r['converged'] else ' (not converged)'}"
                    for r in q["fit_report"])
    print(f"\nqarm: seconds = quantize_embeddings {q['quantize_seconds']:.1f} s (k-means fit + assign "
          f"{q['fit_seconds']:.1f} s) + Parquet zstd write {q['parquet_seconds']:.1f} s "
          f"({q['parquet_mib']:.0f} MiB); generation {q['gen_seconds']:.1f} s excluded "
          f"(its peak RSS {q['gen_peak_rss_gib']:.2f} GiB)")
    print(f"qarm: HR@1 {q['hr1']:.4f}; MSE by level {' / '.join(f'{v:.5f}' for v in q['mse_levels'])}; "
          f"Lloyd iterations accepted {its} (faiss niter {q['niter']}, polish_iter {q['polish_iter']}); "
          f"collision after resolution {q['resolved_collision']:.4f}")
    print(f"qarm: peak RSS {q['peak_rss_gib']:.2f} GiB = x {q['x_gib']:.2f} GiB + "
          f"{q['peak_rss_gib'] - q['x_gib']:.2f} GiB ({q['peak_rss_gib'] / q['x_gib']:.2f}x x)")
    print(f"\nsgemm {g['shape']}: {g['gflops']:.1f} GFLOP/s best of 5 (median {g['gflops_median']:.1f}), "
          f"{g['threads']} threads, numpy BLAS, measured in this run; for reference faiss IndexFlatL2 "
          f"search (200k x K=256) reaches {g['faiss_search_gflops']:.1f} GFLOP/s")
    parts = ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in macs.items())
    print(f"FLOP floor: {total_macs / 1e9:,.0f} G multiply-adds ({parts}) x 2 / sgemm rate = {floor:.1f} s")
    print(f"qarm measured / floor: {q['seconds'] / floor:.2f}x "
          f"(k-means fit + assign part alone: {q['fit_seconds'] / floor:.2f}x)")
    if not args.skip_baselines:
        sub = (f"a seeded {rq['train_rows']:,}-row subsample" if rq["train_rows"] < n
               else f"all {n:,} rows (--baseline-train >= n)")
        print(f"faiss RQ: trained on {sub} ({rq['train_seconds']:.1f} s of its time, included), then encoded "
              f"and decoded all {n:,} rows in chunks of 100k")
        print(f"torch mini-batch: MSE by level {' / '.join(f'{v:.5f}' for v in mb['mse_levels'])}")
        for name, r in rows[1:]:
            print(f"vs qarm, {name}: time {r['seconds'] / q['seconds']:.2f}x, MSE {r['mse'] / q['mse']:.2f}x, "
                  f"peak RSS {r['peak_rss_gib'] / q['peak_rss_gib']:.2f}x")
    ok_t, ok_m = q["seconds"] <= GOAL_SECONDS, q["peak_rss_gib"] <= GOAL_RSS_GIB
    print(f"\ngoals for qarm at n = {n:,}: <= {GOAL_SECONDS / 60:.0f} min: {'MET' if ok_t else 'NOT MET'} "
          f"({q['seconds']:.1f} s); <= {GOAL_RSS_GIB:.0f} GiB peak RSS: {'MET' if ok_m else 'NOT MET'} "
          f"({q['peak_rss_gib']:.2f} GiB)")


if __name__ == "__main__":
    main()
