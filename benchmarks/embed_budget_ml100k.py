"""What training budget makes the fine-tuned embeddings beat MiniLM? A learning curve on ML-100K.

Trains the three-segment model on a published snapshot's training-period inputs (kept judged pairs,
QA, items) exactly as the train stage does (``embed.train.loop``: same session, steps, optimizer and
numeric type), and every ``--eval-every`` steps embeds the catalog with the model in memory and
scores recall@10/50 + MRR of future co-occurrence (``qarm_core.evaluation.embedding_table``: the
validation and test periods' consecutive positives among training items), next to the base model
and MiniLM on the same pairs. One run per learning rate in ``--lrs``; the step and learning rate are
chosen on VALIDATION recall@10 and the test figures of that choice are the result (the test columns
of other rows are printed for the curve's shape only, not to choose).

    python benchmarks/embed_budget_ml100k.py --home QARM_HOME [--max-steps 400] [--eval-every 50]
        [--lrs 1e-4,3e-4] [--seed 1] [--config configs/ml100k.yaml] [--out results.json]

Needs a published snapshot of ``qarm refresh --config configs/ml100k.yaml`` under ``--home``.
Training seconds exclude the evaluation passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import machine, table  # noqa: E402


def _published_inputs(cfg) -> dict:
    import numpy as np

    from qarm_core.storage import Storage, read_dataset
    from tasks.evaluate import evaluation_inputs

    import pyarrow.parquet as pq

    inputs = evaluation_inputs.fn(cfg)
    rec = {n: Storage(cfg.home).current().record(n) for n in ("items", "judgments", "qa", "train_events")}

    def columns(name: str, cols: list[str]):
        # only what training reads, straight from the files: runs on snapshots of older schema versions too
        return pq.read_table(rec[name].path, columns=cols)

    return {"items": read_dataset(rec["items"]),
            "judgments": columns("judgments", ["src_item", "dst_item", "source", "keep"]),
            "qa": columns("qa", ["item_id", "qa_index", "question", "answer"]),
            "events": inputs["events"], "snapshot": inputs["snapshot_id"],
            "train_items": np.unique(read_dataset(rec["train_events"], columns=["item_id"])["item_id"].to_numpy())}


def _scores(vectors: dict, data: dict, min_rating: float | None) -> dict:
    """model -> {"valid"|"test": {recall@10, recall@50, mrr, pairs}}."""
    from qarm_core.evaluation import embedding_table

    out: dict = {}
    for r in embedding_table(vectors, data["train_items"], data["events"], min_rating):
        out.setdefault(r["model"], {})[r["period"]] = {k: r[k] for k in ("recall_at_10", "recall_at_50", "mrr", "pairs")}
    return out


def recall_difference_ci(a: tuple, b: tuple, data: dict, min_rating: float | None, k: int = 10,
                         n_boot: int = 2000, seed: int = 0) -> dict:
    """Test recall@k of embeddings ``a`` minus ``b`` (each (item_ids, vectors)) on the same test
    pairs, with a 95% paired bootstrap interval over the pairs (a pair's two queries resampled
    together). Returns {"diff", "lo", "hi", "pairs"}."""
    import numpy as np

    from qarm_core.embed.data import positive_pairs
    from qarm_core.embed.evaluate import cooccurrence_pairs, ranks_of_positives

    common = np.intersect1d(a[0], b[0])
    pairs = cooccurrence_pairs(data["events"]["test"], np.intersect1d(data["train_items"], common), min_rating)
    src, dst = positive_pairs(pairs, common, "embed", dataset="test_pairs")

    def hits(ids, x):            # (n_pairs,) hits of the two directions of each pair, summed
        r = ranks_of_positives(ids, x, np.concatenate([src, dst]), np.concatenate([dst, src]))
        return (r[:len(src)] <= k).astype(np.float64) + (r[len(src):] <= k)

    d = hits(*a) - hits(*b)
    rng = np.random.default_rng(seed)
    boot = np.array([d[rng.integers(0, len(d), len(d))].mean() / 2 for _ in range(n_boot)])
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"diff": float(d.mean() / 2), "lo": float(lo), "hi": float(hi), "pairs": int(len(d))}


def _baselines(cfg, data: dict, work: Path) -> dict:
    from qarm_core.embed.embed import embed_catalog, embed_catalog_minilm
    from qarm_core.quantize.io import read_embeddings

    base = embed_catalog(data["items"], work / "base", cfg.embed.model, cfg.embed.infer)
    minilm = embed_catalog_minilm(data["items"], work / "minilm", cfg.embed.infer)
    return {"base": read_embeddings(base.path), "minilm": read_embeddings(minilm.path)}


def _resumed_max_steps(run_dir: Path) -> int:
    """The ``max_steps`` an earlier curve's run was started with (its fingerprint holds it), read from
    the last line of its training log."""
    log = run_dir / "train_log.jsonl"
    if not log.exists():
        raise SystemExit(f"--continue-from {run_dir}: no train_log.jsonl there (not a run folder of this benchmark)")
    return int(json.loads(log.read_text().strip().splitlines()[-1])["max_steps"])


def learning_curve(cfg, data: dict, lr: float, max_steps: int, eval_every: int, work: Path,
                   on_row=lambda row: None, reference: tuple | None = None,
                   continue_from: Path | None = None) -> list[dict]:
    """Train with ``lr`` to ``max_steps``; every ``eval_every`` steps (and at the first step) score the
    model in memory. Returns one row per evaluation: step, training seconds so far, scores (each also
    handed to ``on_row`` as it is measured), and with ``reference`` (item_ids, vectors: MiniLM) the test
    recall@10 difference to it with its paired bootstrap 95% interval. ``continue_from``: an earlier
    curve's run folder (same config, seed, learning rate and snapshot: the run's fingerprint checks it)
    whose newest checkpoint the curve continues from; the learning rate does not depend on
    ``max_steps`` (warm-up only), so this equals one longer run, and the first row re-measures the
    earlier run's last one. Training seconds then count this invocation's steps only."""
    import numpy as np

    from qarm_core.embed.embed import encode_with_model
    from qarm_core.embed.data import item_texts
    from qarm_core.embed.train.distributed import training_dtype
    from qarm_core.embed.train.loop import run_steps, start_session

    tcfg = cfg.embed.train.model_copy(update={"lr": lr, "max_steps": max_steps, "max_seconds": None,
                                              "checkpoint_every": max_steps})
    tcfg = tcfg.model_copy(update={"dtype": training_dtype(tcfg).name})
    if continue_from is None:
        run_dir, first_cfg = Path(tempfile.mkdtemp(prefix=f"lr{lr:g}-", dir=work)), tcfg   # a fresh run
    else:
        run_dir, first_cfg = continue_from, tcfg.model_copy(update={"max_steps": _resumed_max_steps(continue_from)})
    session = start_session(data["items"], data["judgments"], data["qa"], run_dir, cfg.embed.model, first_cfg)
    if continue_from is not None and session.start == 0:
        raise SystemExit(f"--continue-from {continue_from}: no checkpoint to continue from")
    print(f"lr {lr:g}: run folder {run_dir}, from step {session.start}", flush=True)
    ids = np.sort(data["items"]["item_id"].to_numpy().astype(np.int64))
    texts = item_texts(data["items"], cfg.embed.model, ids.tolist())
    rows, train_s, step = [], 0.0, session.start
    while True:
        session.model.eval()
        with session.autocast:
            x = encode_with_model(session.loaded, cfg.embed.model, texts, ids.tolist(), cfg.embed.infer.batch_size,
                                  str(session.device))
        session.model.train()
        sc = _scores({"fine-tuned": (ids, x)}, data, cfg.events.positive_min_rating)["fine-tuned"]
        rows.append({"lr": lr, "step": step, "train_seconds": round(train_s, 1), **{
            f"{p}.{k}": v for p, d in sc.items() for k, v in d.items()}})
        if reference is not None:
            ci = recall_difference_ci((ids, x), reference, data, cfg.events.positive_min_rating)
            rows[-1] |= {"test.r10_minus_ref": ci["diff"], "test.r10_minus_ref_lo": ci["lo"],
                         "test.r10_minus_ref_hi": ci["hi"]}
        on_row(rows[-1])
        print(f"lr {lr:g} step {step}: train {train_s:.0f} s, valid recall@10 {sc['valid']['recall_at_10']:.4f}, "
              f"test recall@10 {sc['test']['recall_at_10']:.4f}", flush=True)
        if step >= max_steps:
            return rows
        # the session's loop runs to its config's max_steps; raise it one segment at a time
        session.cfg = tcfg.model_copy(update={"max_steps": min(step + eval_every, max_steps)})
        session.start = step
        t0 = time.perf_counter()
        step, _, _, _ = run_steps(session, None)
        train_s += time.perf_counter() - t0


def main() -> None:
    from qarm_core.config import load_config
    from qarm_core.devices import hardware_summary

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True, help="QARM_HOME with a published ML-100K snapshot")
    ap.add_argument("--config", default=str(REPO / "configs" / "ml100k.yaml"))
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lrs", default="1e-4,3e-4", help="learning rates of the body, comma-separated")
    ap.add_argument("--seed", type=int, default=None,
                    help="embed.train.seed, which orders the training pairs (default: the config's)")
    ap.add_argument("--out", help="write the rows as JSON here too")
    ap.add_argument("--continue-from", type=Path,
                    help="continue an earlier curve from the newest checkpoint of its run folder (printed at its "
                         "start; one learning rate in --lrs, the same seed and config)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "qarm_embed_budget"),
                    help="scratch folder (the baselines' embeddings are reused from here)")
    args = ap.parse_args()
    cfg = load_config(args.config, {"home": args.home} | ({"embed.train.seed": args.seed} if args.seed is not None else {}))
    print(f"# {machine()}", flush=True)
    data = _published_inputs(cfg)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vectors = _baselines(cfg, data, work)
    base = _scores(vectors, data, cfg.events.positive_min_rating)
    rows: list[dict] = []

    def keep(row: dict) -> None:    # written as measured: a stopped run keeps its curve so far
        rows.append(row)
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows, "baselines": base, "hardware": hardware_summary()},
                                                 indent=2))

    lrs = [float(v) for v in args.lrs.split(",")]
    if args.continue_from is not None and len(lrs) != 1:
        raise SystemExit("--continue-from continues one run: give one learning rate in --lrs")
    for lr in lrs:
        learning_curve(cfg, data, lr, args.max_steps, args.eval_every, work, keep, reference=vectors["minilm"],
                       continue_from=args.continue_from)
    best = max(rows, key=lambda r: (r["valid.recall_at_10"], -r["step"]))
    print(f"\nsnapshot {data['snapshot']}; batch {cfg.embed.train.batch_size} pairs; {hardware_summary()}")
    print(table(["lr", "step", "train s", "valid R@10", "valid R@50", "valid MRR", "test R@10", "test R@50", "test MRR",
                 "test R@10 - MiniLM [95% CI]"],
                [[f"{r['lr']:g}", r["step"], r["train_seconds"], *(f"{r[f'{p}.{k}']:.4f}" for p in ("valid", "test")
                                                                    for k in ("recall_at_10", "recall_at_50", "mrr")),
                  f"{r['test.r10_minus_ref']:+.4f} [{r['test.r10_minus_ref_lo']:+.4f}, {r['test.r10_minus_ref_hi']:+.4f}]"]
                 for r in rows]))
    print(table(["baseline", "valid R@10", "valid R@50", "valid MRR", "test R@10", "test R@50", "test MRR"],
                [[m, *(f"{d[p][k]:.4f}" for p in ("valid", "test") for k in ("recall_at_10", "recall_at_50", "mrr"))]
                 for m, d in base.items()]))
    m = base["minilm"]
    print(f"\nchosen on validation: lr {best['lr']:g}, step {best['step']} ({best['train_seconds']} s of training): "
          f"test recall@10 {best['test.recall_at_10']:.4f} vs MiniLM {m['test']['recall_at_10']:.4f} "
          f"and base {base['base']['test']['recall_at_10']:.4f}; "
          f"beats both: {best['test.recall_at_10'] > max(m['test']['recall_at_10'], base['base']['test']['recall_at_10'])}; "
          f"difference to MiniLM {best['test.r10_minus_ref']:+.4f}, 95% paired bootstrap CI "
          f"[{best['test.r10_minus_ref_lo']:+.4f}, {best['test.r10_minus_ref_hi']:+.4f}]")


if __name__ == "__main__":
    main()
