"""Benchmark: Semantic-ID quantisation of 10M x 128 synthetic embeddings, end to end.

qarm (2 x 256 full-batch residual k-means + FSQ, assign all, resolve, metrics, codes -> Parquet;
``flows.bench_quantize.run_quantize_bench``, the same function as ``qarm bench quantize``)
against its FLOP floor (multiply-adds of the k-means passes qarm ran, warm-up sample included, of
FSQ and of decode HR@k's catalog scans, which run at the stage's default sample as deployed / the
sgemm rate measured in this run; the ratio without decode HR@k is printed too) and two baselines at the same code space 256^3:
faiss ResidualQuantizer (3 x 8 bits, trained on a subsample whose k-means uses every training row,
encodes all rows) and a mini-batch residual k-means in torch (3 x 256, Sculley-style per-centroid
rates). Each phase runs in its own process (benchmarks/harness.py) so its peak RSS is its own;
every figure printed is measured in this run. Goals checked (not asserted): qarm <= 10 minutes and
<= 8 GiB peak RSS.

    python benchmarks/bench_quantize.py [--n 10000000 --dim 128 --baseline-n 1000000 --skip-baselines
                                         --decode-hr-sample 1000]

With --baseline-n below --n, the baselines run at that size and qarm runs a second time at it, so
that every ratio compares runs on the same data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import loadavg, run_phase, table  # noqa: E402

GOAL_SECONDS = 600.0
GOAL_RSS_GIB = 8.0


def _threads(threads: int) -> None:
    try:
        import faiss
        faiss.omp_set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------------------------- phases

def phase_sgemm(threads: int) -> dict:
    """numpy sgemm rate (the floor's divisor) and, for reference, faiss IndexFlatL2 search on the
    shape of one k-means pass (200k rows x K = 256, d = 128)."""
    import faiss
    import numpy as np

    from flows.bench_quantize import sgemm_gflops

    r = sgemm_gflops()
    _threads(threads)
    rng = np.random.default_rng(0)
    xq = rng.standard_normal((200_000, 128), dtype=np.float32)
    index = faiss.IndexFlatL2(128)
    index.add(rng.standard_normal((256, 128), dtype=np.float32))
    index.search(xq[:20_000], 1)
    t0 = time.perf_counter()
    index.search(xq, 1)
    r["faiss_search_gflops"] = 2.0 * 200_000 * 256 * 128 / (time.perf_counter() - t0) / 1e9
    r["threads"] = threads
    return r


def phase_qarm(n: int, dim: int, levels: list[int], fsq_dims: int, fsq_levels: int, seed: int,
               threads: int, decode_hr_sample: int = 0) -> dict:
    from flows.bench_quantize import run_quantize_bench

    return run_quantize_bench(n, dim, tuple(levels), fsq_dims, fsq_levels, seed, decode_hr_sample=decode_hr_sample)


def phase_faiss_rq(n: int, dim: int, seed: int, threads: int, train: int, beam: int,
                   chunk: int = 100_000) -> dict:
    import faiss
    import numpy as np

    from flows.bench_quantize import generate
    from qarm_core.quantize.metrics import collision_metrics

    _threads(threads)
    t0 = time.perf_counter()
    _, x = generate(n, dim, seed)
    gen_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    rq = faiss.ResidualQuantizer(dim, 3, 8)                  # 3 levels x 256 = code space 2^24
    rq.max_beam_size = beam
    m = min(train, n)
    # Its per-level k-means would subsample to 256 points per centroid (faiss default): told
    # explicitly to use every training row.
    rq.cp.max_points_per_centroid = -(-m // 256)
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
            "beam": beam, "max_points_per_centroid": int(rq.cp.max_points_per_centroid),
            "kmeans_niter": int(rq.cp.niter),
            "mse": se / n, "collision": col["collision_rate"], "edge_num": col["edge_num"]}


def phase_torch_mb(n: int, dim: int, seed: int, threads: int, k: int = 256, n_levels: int = 3,
                   batch: int = 65536, steps: int = 200, chunk: int = 262_144) -> dict:
    """Residual mini-batch k-means (Sculley 2010): per level, init from random rows, ``steps``
    mini-batches with per-centroid learning rate 1/count, then assign all rows and subtract."""
    import torch

    from flows.bench_quantize import generate
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


def _phase(name: str, threads: int, **kw) -> dict:
    return run_phase(f"benchmarks.bench_quantize:phase_{name}", pin_threads=threads, threads=threads, **kw)


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
    ap.add_argument("--baseline-n", type=int, default=None, help="rows for the baselines (default --n)")
    ap.add_argument("--baseline-train", type=int, default=1_000_000,
                    help="rows the faiss ResidualQuantizer baseline is trained on (it encodes all rows)")
    ap.add_argument("--rq-beam", type=int, default=5, help="ResidualQuantizer max_beam_size (faiss default 5)")
    ap.add_argument("--mb-steps", type=int, default=200, help="mini-batch steps per level (torch baseline)")
    ap.add_argument("--mb-batch", type=int, default=65536)
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--decode-hr-sample", type=int, default=None,
                    help="decode HR@k queries (default: the quantize stage's own default; 0: off)")
    args = ap.parse_args()
    if args.decode_hr_sample is None:
        from qarm_core.quantize.config import QuantizerParams

        args.decode_hr_sample = QuantizerParams().decode_hr_sample
    from benchmarks.harness import machine

    print(f"# {machine()}", flush=True)
    levels = [int(v) for v in args.levels.split(",")]
    fsq_cells = args.fsq_levels ** args.fsq_dims
    space = fsq_cells
    for k in levels:
        space *= k
    n, d, th = args.n, args.dim, args.threads
    bn = args.baseline_n or n
    loads = {"start": loadavg()}

    def qarm_at(rows: int) -> dict:
        return _phase("qarm", th, n=rows, dim=d, levels=levels, fsq_dims=args.fsq_dims,
                      fsq_levels=args.fsq_levels, seed=args.seed, decode_hr_sample=args.decode_hr_sample)

    g = _phase("sgemm", th)
    loads["after sgemm"] = loadavg()
    q = qarm_at(n)
    loads[f"after qarm n={n:,}"] = loadavg()
    qname = f"qarm {'+'.join(map(str, levels))} full batch + FSQ {fsq_cells}"
    rows = [(qname, n, q)]
    qb = q
    if not args.skip_baselines:
        if fsq_cells != 256 or levels != [256, 256]:
            print("note: baselines are 3 x 256 (2^24); qarm's code space here is", space)
        if bn != n:
            qb = qarm_at(bn)
            loads[f"after qarm n={bn:,}"] = loadavg()
            rows.append((qname, bn, qb))
        rq = _phase("faiss_rq", th, n=bn, dim=d, seed=args.seed, train=args.baseline_train, beam=args.rq_beam)
        loads["after faiss RQ"] = loadavg()
        mb = _phase("torch_mb", th, n=bn, dim=d, seed=args.seed, steps=args.mb_steps, batch=args.mb_batch)
        loads["after torch"] = loadavg()
        rows += [(f"faiss RQ 3x8 bits, beam {rq['beam']}", bn, rq),
                 (f"torch mini-batch 3x256, {mb['steps']}x{mb['batch']}", bn, mb)]

    macs = q["macs"]
    total_macs = sum(macs.values())
    floor = 2.0 * total_macs / (g["gflops"] * 1e9)

    print(f"\nquantize {n:,} x {d} float32 synthetic embeddings (seeded mixture of Gaussians on the sphere, "
          f"x = {q['x_gib']:.2f} GiB), code space {space:,}; {th} threads\n")
    print(table(["method", "rows", "seconds", "peak RSS GiB", "MSE", "raw collision", "EdgeNum"],
                [(name, f"{rn:,}", f"{r['seconds']:.1f}", f"{r['peak_rss_gib']:.2f}", f"{r['mse']:.5f}",
                  f"{r['collision']:.4f}", f"{r['edge_num']:.3f}") for name, rn, r in rows]))
    print("\nseconds: the method's work (generation of the embeddings excluded); peak RSS: the whole "
          "phase process, generation included")

    for rn, qq in ((n, q),) + (((bn, qb),) if qb is not q else ()):
        its = ", ".join(f"L{r['level']}: {r['lloyd_iterations']}{'' if r['converged'] else ' (not converged)'}"
                        + (f" after {r['warmup_iterations']} on a {r['warmup_rows']:,}-row warm-up sample"
                           if "warmup_rows" in r else "") for r in qq["fit_report"])
        ss = dict(qq["stage_seconds"])
        dhr = ss.pop("decode_hr", None)
        st = ", ".join(f"{k} {v:.1f}" + (f" (decode HR@k {dhr:.1f} of it, {qq['decode_hr_queries']:,} decodings, "
                                          f"each scanning all rows)" if k == "metrics" and dhr else "")
                       for k, v in ss.items())
        print(f"\nqarm n={rn:,}: seconds = quantize_embeddings {qq['quantize_seconds']:.1f} s ({st}) + Parquet zstd "
              f"write {qq['parquet_seconds']:.1f} s ({qq['parquet_mib']:.0f} MiB); generation "
              f"{qq['gen_seconds']:.1f} s excluded (peak RSS after generation {qq['gen_peak_rss_gib']:.2f} GiB)")
        print(f"qarm n={rn:,}: HR@1 {qq['hr1']:.4f} (trivially ~1 on unit-norm data, see metrics.hit_rates); "
              f"MSE by level {' / '.join(f'{v:.5f}' for v in qq['mse_levels'])}; Lloyd updates accepted {its} "
              f"(at most niter + polish_iter = {qq['niter'] + qq['polish_iter']}); collision: k-means only "
              f"{qq['rkmeans_collision']:.4f}, raw {qq['collision']:.4f}, after resolution "
              f"{qq['resolved_collision']:.4f} (suffixed {qq['suffixed_share']:.4f})")
        print(f"qarm n={rn:,}: peak RSS {qq['peak_rss_gib']:.2f} GiB = x {qq['x_gib']:.2f} GiB + "
              f"{qq['peak_rss_gib'] - qq['x_gib']:.2f} GiB")
        if "cpu_seconds" in qq:
            print(f"qarm n={rn:,}: CPU time of the measured work {qq['cpu_seconds']:.1f} s over all threads = "
                  f"{qq['cpu_seconds'] / qq['seconds']:.2f} CPUs busy on average while it ran ({th} threads)")
    print(f"\nsgemm {g['shape']}: {g['gflops']:.1f} GFLOP/s best of 5 (median {g['gflops_median']:.1f}), "
          f"{g['threads']} threads, numpy BLAS, measured in this run; the k-means pass shape "
          f"(256x128)@(128x16384) on 1 thread: {g['pass_shape_gflops_1thread']:.1f}; faiss IndexFlatL2 "
          f"search (200k x K=256): {g['faiss_search_gflops']:.1f} GFLOP/s")
    parts = ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in macs.items())
    print(f"FLOP floor (n={n:,}): {total_macs / 1e9:,.0f} G multiply-adds ({parts}) x 2 / sgemm rate = {floor:.1f} s")
    floor_km = 2.0 * (macs["kmeans_distances"] + macs["kmeans_other"]) / (g["gflops"] * 1e9)
    print(f"qarm measured / floor: {q['seconds'] / floor:.2f}x "
          f"(k-means fit + assign alone: {q['fit_seconds']:.1f} s / its {floor_km:.1f} s = {q['fit_seconds'] / floor_km:.2f}x)")
    dhr = q["stage_seconds"].get("decode_hr")
    if dhr:
        # the ratio as runs without decode HR@k reported it (its scans and their seconds left out)
        floor_wo = 2.0 * (total_macs - macs["decode_hr"]) / (g["gflops"] * 1e9)
        floor_dhr = 2.0 * macs["decode_hr"] / (g["gflops"] * 1e9)
        print(f"without decode HR@k: {q['seconds'] - dhr:.1f} s / {floor_wo:.1f} s = {(q['seconds'] - dhr) / floor_wo:.2f}x; "
              f"decode HR@k alone: {dhr:.1f} s / {floor_dhr:.1f} s = {dhr / floor_dhr:.2f}x")
    if not args.skip_baselines:
        sub = (f"a seeded {rq['train_rows']:,}-row subsample" if rq["train_rows"] < bn
               else f"all {bn:,} rows (--baseline-train >= n)")
        print(f"faiss RQ: trained on {sub} (its k-means told max_points_per_centroid="
              f"{rq['max_points_per_centroid']:,}, i.e. no further subsampling; {rq['kmeans_niter']} iterations; "
              f"{rq['train_seconds']:.1f} s of its time, included), then encoded and decoded all {bn:,} rows")
        print(f"torch mini-batch: MSE by level {' / '.join(f'{v:.5f}' for v in mb['mse_levels'])}")
        for name, rn, r in rows:
            if r is q or r is qb:
                continue
            print(f"vs qarm at n={bn:,}, {name}: time {r['seconds'] / qb['seconds']:.2f}x, MSE "
                  f"{r['mse'] / qb['mse']:.3f}x, collision {r['collision'] / qb['collision']:.3f}x, peak RSS "
                  f"{r['peak_rss_gib'] / qb['peak_rss_gib']:.2f}x")
    ok_t, ok_m = q["seconds"] <= GOAL_SECONDS, q["peak_rss_gib"] <= GOAL_RSS_GIB
    print(f"\ngoals for qarm at n = {n:,}: <= {GOAL_SECONDS / 60:.0f} min: {'MET' if ok_t else 'NOT MET'} "
          f"({q['seconds']:.1f} s); <= {GOAL_RSS_GIB:.0f} GiB peak RSS: {'MET' if ok_m else 'NOT MET'} "
          f"({q['peak_rss_gib']:.2f} GiB)")
    print("\nmachine load during the run (other work shares these CPUs):")
    for k, v in loads.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
