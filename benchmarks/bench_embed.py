"""Benchmark of the embedding LLM (stages 3-4) on ML-100K with the default model, on this CPU.

Phases, each in its own process so that each gets its own peak RSS:

* ``train``: fine-tune SmolLM2-135M (as qarm trains: `--deepspeed auto`, `--attn auto`; dtype auto, plus float32 where auto is bf16) for ``--steps`` steps on
  Swing pairs (ratings >= 4) with template QA; training tokens/s (wall, after the first step) and
  tokens per 2 CPU-seconds (what the 2 cores would do uncontended), s/step, peak RSS, system CPU
  time. Run twice: as qarm runs it, and with ``QARM_KEEP_FREED_MEMORY=0`` (glibc's default
  allocator behaviour; see ``qarm_core/allocator.py``), unless ``--no-allocator-compare``.
* ``adamw``: one AdamW step over a flat fp32 buffer of the model's size, torch's default against
  the fused kernel the trainer uses.
* ``embed``: embed the catalog with the model just trained (fp32 and bf16); items/s, peak RSS.
* ``eval`` (``--eval``): hold out 10% of the unordered Swing pairs, train with the given budget
  on the rest, embed the catalog with the fine-tuned model, the base model (mean-pooled item
  states, and the untrained EMB path) and MiniLM, and print recall@10 / MRR of the held-out pairs.
  Swing pairs stand in for judged pairs here (the judge is not yet in the flow).

Wall-clock rates depend on what else runs on the machine: every row carries the 1-minute load
average measured around it.

    python benchmarks/bench_embed.py [--steps 6] [--batch-size 16] [--freeze-layers 0] [--attn eager]
                                     [--deepspeed auto|on|off] [--eval --budget-s 480] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_BUILD_OPS", "0")
# Passive OpenMP waits: with active spinning, a 2-thread torch process sharing the 2 cores with any
# other busy process ran ~10x slower here (each parallel region waits for a descheduled thread);
# passive measured 210 vs 22 tok/s in that situation. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
sys.path.insert(0, str(REPO))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _ml100k(holdout: float, seed: int = 0):
    """(items, train pairs, held-out pairs, template QA) of ML-100K; Swing on ratings >= 4."""
    import pyarrow.compute as pc

    from qarm_core.embed.data import split_pairs, template_qa
    from qarm_core.ingest import fetch_recbole_wheel, read_ml100k
    from qarm_core.pairs.swing import mine_swing_pairs

    inter, items = read_ml100k(fetch_recbole_wheel(REPO / ".cache" / "recbole"))
    pos = inter.filter(pc.greater_equal(inter["rating"], 4))
    pairs = mine_swing_pairs(pos["user_id"].to_numpy(), pos["item_id"].to_numpy())
    train, held = split_pairs(pairs, holdout, seed) if holdout else (pairs, pairs.slice(0, 0))
    return items, train, held, template_qa(items, 2)


def _train_cfg(args, **over):
    from qarm_core.embed.config import TrainConfig

    kw = dict(batch_size=args.batch_size, max_steps=args.steps, use_deepspeed={"auto": "auto", "on": True, "off": False}[args.deepspeed],
              zero_stage=args.zero_stage, dtype=args.dtype, freeze_layers=args.freeze_layers,
              checkpoint_every=10**6, lr=args.lr, proj_lr=args.proj_lr, anneal_steps=args.anneal_steps,
              warmup_steps=min(5, args.steps), num_threads=2)
    kw.update(over)
    return TrainConfig(**kw)


def _model_cfg(args, model: str = "smollm2"):
    from qarm_core.embed.config import EmbedModelConfig

    return EmbedModelConfig(model=model, attn_implementation=args.attn, max_qa_tokens=args.max_qa_tokens)


def phase_train(args) -> dict:
    from qarm_core.embed.train import train_embedding_model

    items, pairs, _, qa = _ml100k(0.0)
    out = Path(args.work) / "train"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    steps: list[dict] = []
    cpu: list[float] = []

    def progress(d: dict) -> None:
        steps.append(d)
        cpu.append(time.process_time())

    load0 = os.getloadavg()[0]
    c0 = time.process_time()
    rec = train_embedding_model(items, pairs, qa, out, _model_cfg(args), _train_cfg(args), progress=progress)
    load1 = os.getloadavg()[0]
    # steady state: from the end of step 1 to the end of the last step
    tok = steps[-1]["tokens"] - steps[0]["tokens"]
    wall = steps[-1]["seconds"] - steps[0]["seconds"]
    cpu_s = cpu[-1] - cpu[0]
    return {"phase": "train", "deepspeed": rec.deepspeed, "zero_stage": rec.zero_stage, "dtype": rec.dtype,
            "dtype_reason": rec.dtype_reason,
            "attn": args.attn, "freeze_layers": args.freeze_layers, "batch_size": args.batch_size,
            "steps": rec.steps, "tokens_per_step": tok / max(1, len(steps) - 1),
            "tokens_per_s": tok / wall if wall > 0 else 0.0, "tokens_per_2cpu_s": 2 * tok / cpu_s if cpu_s > 0 else 0.0,
            "s_per_step": wall / max(1, len(steps) - 1), "first_step_s": steps[0]["seconds"],
            "all_tokens_per_s": rec.tokens_per_s, "peak_rss_mb": _rss_mb(), "loadavg_1m": (load0 + load1) / 2,
            "model_dir": rec.model_dir, "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "setup_cpu_s": cpu[0] - c0 if cpu else 0.0,
            "sys_cpu_s": resource.getrusage(resource.RUSAGE_SELF).ru_stime}


def phase_embed(args) -> dict:
    from qarm_core.embed.config import EmbedConfig
    from qarm_core.embed.embed import embed_catalog

    all_items, _, _, _ = _ml100k(0.0)
    res = {"phase": "embed"}
    # both types on this CPU (float32 stands in for a CPU without native bf16, where auto picks it)
    for dtype, n in (("bfloat16", args.embed_items or all_items.num_rows),
                     ("float32", args.fp32_items or args.embed_items or all_items.num_rows)):
        items = all_items.slice(0, n)
        out = Path(args.work) / f"emb-{dtype}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        load0, c0 = os.getloadavg()[0], time.process_time()
        rec = embed_catalog(items, out, _model_cfg(args, args.model_dir),
                            EmbedConfig(batch_size=64, dtype=dtype, num_threads=2))
        cpu_s = time.process_time() - c0
        res[dtype] = {"items": rec.rows, "items_per_s": rec.items_per_s, "items_per_2cpu_s": 2 * rec.rows / cpu_s,
                      "seconds": rec.seconds, "loadavg_1m": (load0 + os.getloadavg()[0]) / 2}
    res["peak_rss_mb"] = _rss_mb()
    return res


def phase_eval(args) -> dict:
    import pyarrow.parquet as pq

    from qarm_core.embed.config import EmbedConfig
    from qarm_core.embed.embed import embed_catalog, embed_catalog_minilm
    from qarm_core.embed.evaluate import evaluate_embeddings
    from qarm_core.embed.train import train_embedding_model

    items, train, held, qa = _ml100k(args.holdout)
    work = Path(args.work) / "eval"
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(held, work / "heldout_pairs.parquet")
    res: dict = {"phase": "eval", "train_pair_rows": train.num_rows, "heldout_pair_rows": held.num_rows}
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    cfg = _train_cfg(args, max_steps=args.eval_steps, max_seconds=args.budget_s, checkpoint_every=50,
                     batch_size=args.eval_batch_size)
    rec = train_embedding_model(items, train, qa, work / "train", _model_cfg(args), cfg)
    res["train"] = {"steps": rec.steps, "seconds": rec.seconds, "tokens_per_s": rec.tokens_per_s,
                    "loss_first": rec.loss_first, "loss_last": rec.loss_last, "reused": rec.reused,
                    "loadavg_1m": (load0 + os.getloadavg()[0]) / 2, "wall_s": time.perf_counter() - t0}
    ecfg = EmbedConfig(batch_size=64, dtype="bfloat16", num_threads=2)
    runs = {
        "fine-tuned": lambda o: embed_catalog(items, o, _model_cfg(args, rec.model_dir), ecfg),
        "base (mean of item states)": lambda o: embed_catalog(items, o, _model_cfg(args), ecfg),
        "base (untrained EMB path)": lambda o: embed_catalog(
            items, o, _model_cfg(args), EmbedConfig(batch_size=64, dtype="bfloat16", num_threads=2, base_pooling="emb")),
        "MiniLM": lambda o: embed_catalog_minilm(items, o, EmbedConfig(batch_size=64, num_threads=2)),
    }
    res["models"] = {}
    for i, (name, fn) in enumerate(runs.items()):
        out = work / f"emb-{i}"
        t = time.perf_counter()
        er = fn(out)
        m = evaluate_embeddings(out, held, k=10)
        res["models"][name] = {"recall@10": m.recall_at_k, "mrr": m.mrr, "queries": m.queries, "dim": er.dim,
                               "embed_s": time.perf_counter() - t, "model_version": m.model_version}
    res["peak_rss_mb"] = _rss_mb()
    return res


def phase_adamw(args) -> dict:
    """One AdamW step over a flat fp32 buffer of the default model's size (what ZeRO hands the
    optimizer): torch's default (foreach) implementation against the fused kernel qarm uses."""
    import torch

    n = args.adamw_numel
    res = {"phase": "adamw", "numel": n}
    for name, kw in (("foreach", {}), ("fused", {"fused": True})):
        p = torch.nn.Parameter(torch.zeros(n))
        p.grad = torch.randn(n)
        opt = torch.optim.AdamW([p], lr=1e-4, weight_decay=0.01, **kw)
        opt.step()
        t = time.perf_counter()
        for _ in range(3):
            opt.step()
        res[name] = (time.perf_counter() - t) / 3
    return res


def _run_phase(phase: str, argv: list[str], extra: list[str] | None = None, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", phase, *argv, *(extra or [])],
                         capture_output=True, text=True, cwd=str(REPO), env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=["train", "embed", "eval", "adamw"], default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--freeze-layers", type=int, default=0)
    ap.add_argument("--attn", choices=["auto", "packed", "eager", "sdpa"], default="auto",
                    help="embed.model.attn_implementation (auto: packed rows for float32 training on a CPU)")
    ap.add_argument("--deepspeed", choices=["auto", "on", "off"], default="auto",
                    help="embed.train.use_deepspeed (auto: plain torch for one process on a CPU)")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="training dtype; with auto resolving to bf16, a float32 run is added (the path a CPU "
                         "without native bf16 takes)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--proj-lr", type=float, default=1e-3)
    ap.add_argument("--anneal-steps", type=int, default=20)
    ap.add_argument("--max-qa-tokens", type=int, default=64)
    ap.add_argument("--embed-items", type=int, default=0, help="embed only the first N items (0: all)")
    ap.add_argument("--fp32-items", type=int, default=0, help="items embedded in fp32 (0: as many as in bf16)")
    ap.add_argument("--model-dir", default=None, help="(embed phase) the trained model folder")
    ap.add_argument("--eval", action="store_true", help="also run the fine-tuned vs base vs MiniLM comparison")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--eval-steps", type=int, default=1000)
    ap.add_argument("--budget-s", type=float, default=420.0, help="(eval) training time budget")
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--work", default=str(REPO / ".cache" / "bench_embed"))
    ap.add_argument("--adamw-numel", type=int, default=134_591_168,
                    help="(adamw) parameters of the default model (SmolLM2-135M + EMB rows + projection)")
    ap.add_argument("--allocator-compare", action="store_true",
                    help="add a training run with glibc's default allocator behaviour (QARM_KEEP_FREED_MEMORY=0)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)

    if args.phase:
        import torch

        torch.set_num_threads(2)
        fn = {"train": phase_train, "embed": phase_embed, "eval": phase_eval, "adamw": phase_adamw}[args.phase]
        print(json.dumps(fn(args)))
        return {}

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--eval", "--eval-only")]
    passthrough = [a for i, a in enumerate(passthrough)
                   if a != "--json" and (i == 0 or passthrough[i - 1] != "--json")]
    res: dict = {}
    rows: list[tuple[str, str]] = []
    if not args.eval_only:
        def train_row(tr: dict, note: str) -> tuple[str, str]:
            return (f"train: {'DeepSpeed ZeRO-' + str(tr['zero_stage']) if tr['deepspeed'] else 'torch'}"
                    f", {tr['dtype']}, {tr['attn']}, batch {tr['batch_size']} pairs, "
                    f"freeze {tr['freeze_layers']} layers{note}",
                    f"{tr['tokens_per_s']:.1f} tok/s wall ({tr['tokens_per_2cpu_s']:.1f} per 2 CPU-s), "
                    f"{tr['s_per_step']:.1f} s/step, {tr['tokens_per_step']:.0f} tok/step, first step "
                    f"{tr['first_step_s']:.1f} s, peak RSS {tr['peak_rss_mb']:.0f} MB, sys CPU "
                    f"{tr['sys_cpu_s']:.0f} s, load {tr['loadavg_1m']:.1f}")

        tr = _run_phase("train", passthrough)
        res["train"] = tr
        rows.append(train_row(tr, f" ({args.dtype}: {tr['dtype_reason']})"))
        if tr["dtype"] != "float32":
            f32 = [a for i, a in enumerate(passthrough) if a != "--dtype" and (i == 0 or passthrough[i - 1] != "--dtype")]
            t32 = _run_phase("train", f32 + ["--dtype", "float32"])
            res["train_float32"] = t32
            rows.append(train_row(t32, " (float32: the path a CPU without native bf16 takes)"))
        if args.allocator_compare:
            # same run with glibc's default: every large freed block unmapped, fresh pages next step
            tg = _run_phase("train", passthrough, env={"QARM_KEEP_FREED_MEMORY": "0"})
            res["train_glibc_default"] = tg
            rows.append(train_row(tg, " (QARM_KEEP_FREED_MEMORY=0)"))
            rows.append(("  freed memory kept vs glibc default",
                         f"{tr['tokens_per_s'] / tg['tokens_per_s']:.2f}x tok/s, "
                         f"{tr['peak_rss_mb'] / tg['peak_rss_mb']:.2f}x peak RSS"))
        aw = _run_phase("adamw", passthrough)
        res["adamw"] = aw
        rows.append((f"AdamW step, {aw['numel'] / 1e6:.0f}M fp32 parameters in one buffer",
                     f"foreach {aw['foreach']:.3f} s, fused {aw['fused']:.3f} s "
                     f"({aw['foreach'] / aw['fused']:.1f}x)"))
        em = _run_phase("embed", passthrough, ["--model-dir", tr["model_dir"]])
        res["embed"] = em
        for dt in ("bfloat16", "float32"):
            e = em[dt]
            rows.append((f"embed {e['items']} items, {dt}, batch 64",
                         f"{e['items_per_s']:.1f} items/s wall ({e['items_per_2cpu_s']:.1f} per 2 CPU-s), "
                         f"{e['seconds']:.1f} s, load {e['loadavg_1m']:.1f}"))
        rows.append(("embed peak RSS", f"{em['peak_rss_mb']:.0f} MB"))
    if args.eval or args.eval_only:
        ev = _run_phase("eval", passthrough)
        res["eval"] = ev
        t = ev["train"]
        rows.append((f"eval: train on {ev['train_pair_rows']} Swing pair rows, budget {args.budget_s:.0f} s",
                     f"{t['steps']} steps in {t['seconds']:.0f} s ({t['tokens_per_s']:.1f} tok/s), loss "
                     f"{t['loss_first']:.3f} -> {t['loss_last']:.3f}, load {t['loadavg_1m']:.1f}"))
        for name, m in ev["models"].items():
            rows.append((f"  {name} (d={m['dim']})",
                         f"recall@10 {m['recall@10']:.4f}  MRR {m['mrr']:.4f}  ({m['queries']} queries, "
                         f"embed {m['embed_s']:.0f} s)"))
    from benchmarks.harness import machine

    rows.append(("machine", machine()))
    w = max(len(r[0]) for r in rows) if rows else 0
    print(f"{'what':<{w}}  result")
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
