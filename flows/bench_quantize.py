"""End-to-end quantizer benchmark on synthetic embeddings, as one function (used by
``qarm bench quantize`` and ``benchmarks/bench_quantize.py``).

Work measured: fit 2 x K residual k-means on every row + the FSQ level, assign all rows, resolve
collisions, compute the metrics, write the codes to Parquet (zstd). Generating the synthetic
embeddings is timed separately and excluded. Every figure returned is measured in the call.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np

GIB = 2.0 ** 30


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def generate(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids ``(n,)``, x ``(n, dim)``): the seeded mixture of Gaussians of ``io.synthetic_embeddings``
    written block by block into one preallocated float32 array (no list of blocks + concatenate,
    which would hold two copies)."""
    from qarm_core.quantize.io import synthetic_embeddings

    x = np.empty((n, dim), np.float32)
    for ids, block in synthetic_embeddings(n, dim, seed=seed):
        x[ids[0]:ids[0] + len(ids)] = block
    return np.arange(n, dtype=np.int64), x


def sgemm_gflops(seconds: float = 3.0, threads: int | None = None) -> dict:
    """float32 GEMM rate of numpy's BLAS on (8192 x 128) @ (128 x 4096), best of 5 timed windows,
    and the rate of the shape the k-means pass runs, (256 x 128) @ (128 x 16384) on one thread."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8192, 128), dtype=np.float32)
    b = rng.standard_normal((128, 4096), dtype=np.float32)
    c = np.empty((8192, 4096), np.float32)

    def best_rate(fn, flop: float) -> tuple[float, float]:
        for _ in range(3):
            fn()                                      # warm up (threads, pages)
        rates = []
        for _ in range(5):
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 5:
                fn()
                reps += 1
            rates.append(reps * flop / (time.perf_counter() - t0) / 1e9)
        return max(rates), float(np.median(rates))

    with threadpool_limits(threads, user_api="blas") if threads else _nullcontext():
        best, median = best_rate(lambda: np.matmul(a, b, out=c), 2.0 * 8192 * 128 * 4096)
    w = rng.standard_normal((256, 128), dtype=np.float32)
    xt = rng.standard_normal((16384, 128), dtype=np.float32)
    g = np.empty((256, 16384), np.float32)
    with threadpool_limits(1, user_api="blas"):
        pass_best, _ = best_rate(lambda: np.matmul(w, xt.T, out=g), 2.0 * 256 * 128 * 16384)
    return {"gflops": best, "gflops_median": median, "shape": "(8192x128)@(128x4096) float32",
            "pass_shape_gflops_1thread": pass_best}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def quantize_macs(n: int, d: int, levels: list[int] | tuple[int, ...], fsq_dims: int, fit_report: list[dict],
                  fsq_sample: int, decode_queries: int = 0) -> dict[str, float]:
    """Multiply-adds of qarm's fit and assignment.

    Per k-means level of K centroids (and likewise on the warm-up sample, if any), Lloyd runs
    1 + it + converged passes (the first pass, one per
    accepted update, and the rejected one that stops it), each n*K*d for the distances (the sgemm)
    plus n*d for the centroid sums; the final labels come from the last accepted pass (no separate
    assignment). Then n*d to subtract the centroids and n*d for the level's exact MSE.
    FSQ: covariance s*d*d and projection s*d*f of its s = min(n, sample) fitting rows, then the
    projection n*d*f of all rows and n*d for its exact MSE. Decode HR@k (``decode_queries``
    decodings, each scanning the catalog): n*d per decoding (its sgemm).
    """
    macs = {"kmeans_distances": 0.0, "kmeans_other": 0.0, "fsq": 0.0}
    for k, rep in zip(levels, fit_report):
        passes = 1 + int(rep["lloyd_iterations"]) + int(bool(rep["converged"]))
        macs["kmeans_distances"] += passes * n * k * d
        macs["kmeans_other"] += passes * n * d + 2 * n * d
        if "warmup_rows" in rep:   # Lloyd on the warm-up sample, same pass structure
            w = 1 + int(rep["warmup_iterations"]) + int(bool(rep["warmup_converged"]))
            macs["kmeans_distances"] += w * rep["warmup_rows"] * k * d
            macs["kmeans_other"] += w * rep["warmup_rows"] * d
    s = min(n, fsq_sample)
    macs["fsq"] = s * d * d + s * d * fsq_dims + n * d * fsq_dims + n * d
    if decode_queries:
        macs["decode_hr"] = float(decode_queries) * n * d
    return macs


def run_quantize_bench(n: int = 10_000_000, dim: int = 128, levels: tuple[int, ...] = (256, 256),
                       fsq_dims: int = 4, fsq_levels: int = 4, seed: int = 0, out: str | Path | None = None,
                       decode_hr_sample: int = 0, hr_sample: int = 20_000) -> dict:
    """Run the end-to-end benchmark in this process; returns a dict of measured figures.

    ``seconds`` is wall time of the measured work; ``cpu_seconds`` its CPU time over all threads
    (on a shared machine wall time / cpu time shows how much of the CPUs the run actually got).

    ``out``: folder for codes.parquet (default: a temporary folder, deleted). ``decode_hr_sample``:
    queries for decode HR@k, each scanning all n items once per decoder (n*dim multiply-adds per
    scan); 0 here, the stage's default (``QuantizerParams.decode_hr_sample``) in
    ``benchmarks/bench_quantize.py``, which reports the floor ratio with and without it.
    """
    import pyarrow.parquet as pq

    from qarm_core.quantize.fsq import fit_fsq
    from qarm_core.quantize.quantizer import QuantizerParams, quantize_embeddings

    params = QuantizerParams(levels=tuple(levels), fsq_dims=fsq_dims, fsq_levels=fsq_levels, seed=seed,
                             decode_hr_sample=decode_hr_sample, hr_sample=hr_sample)
    t0 = time.perf_counter()
    ids, x = generate(n, dim, seed)
    gen_seconds = time.perf_counter() - t0
    gen_rss = peak_rss_gib()
    x_gib = x.nbytes / GIB
    with tempfile.TemporaryDirectory(prefix="qarm_bench_quantize_") as tmp:
        folder = Path(out) if out is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        codebook, table, m = quantize_embeddings(x, ids, params, inplace=True)
        t_quant = time.perf_counter() - t0
        path = folder / "codes.parquet"
        pq.write_table(table, path, compression="zstd")
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
        parquet_bytes = path.stat().st_size
    import inspect
    fsq_sample = int(inspect.signature(fit_fsq).parameters["sample"].default)
    rows = table.num_rows
    del table, x
    return {"n": n, "dim": dim, "levels": list(levels), "fsq_dims": fsq_dims, "fsq_levels": fsq_levels,
            "seconds": seconds, "cpu_seconds": cpu, "gen_seconds": gen_seconds, "gen_peak_rss_gib": gen_rss,
            "x_gib": x_gib,
            "quantize_seconds": t_quant, "fit_seconds": m["fit_seconds"], "parquet_seconds": seconds - t_quant,
            "stage_seconds": {k.split(".", 1)[1]: v for k, v in m.items() if k.startswith("seconds.")},
            "parquet_mib": parquet_bytes / 2 ** 20, "rows": rows,
            "mse": m["level3.mse"], "mse_levels": [m["level1.mse"], m["level2.mse"], m["level3.mse"]],
            "collision": m["raw.collision_rate"], "edge_num": m["raw.edge_num"], "hr1": m["raw.hr@1"],
            "rkmeans_collision": m["rkmeans.collision_rate"], "resolved_collision": m["resolved.collision_rate"],
            "suffixed_share": m["suffixed_share"],
            "fit_report": codebook.fit_report, "niter": params.niter, "polish_iter": params.polish_iter,
            "fsq_sample": min(n, fsq_sample), "peak_rss_gib": peak_rss_gib(),
            "decode_hr_queries": int(m.get("decode_hr.queries", 0)),
            "macs": quantize_macs(n, dim, levels, fsq_dims, codebook.fit_report, fsq_sample,
                                  int(m.get("decode_hr.queries", 0)))}
