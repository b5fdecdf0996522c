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
        [--continue-from RUN_FOLDER [RUN_FOLDER ...]] [--set embed.train.freeze_layers=20 ...]
        [--save-vectors DIR]

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


def recall_difference_ci(a: "tuple | list[tuple]", b: "tuple | list[tuple]", data: dict, min_rating: float | None,
                         k: int = 10, n_boot: int = 2000, seed: int = 0, period: str = "test") -> dict:
    """Recall@k of embeddings ``a`` minus ``b`` (each (item_ids, vectors)) on the same pairs of
    ``period`` (test), with a 95% paired bootstrap interval over the pairs (a pair's two queries
    resampled together). Either side may be a list: runs of one recipe with other training seeds,
    whose hits are averaged per pair (the recipe's mean model, as the ranking comparison averages its
    seeds). Returns {"diff", "lo", "hi", "pairs"}."""
    import numpy as np

    from qarm_core.embed.data import positive_pairs
    from qarm_core.embed.evaluate import cooccurrence_pairs, ranks_of_positives

    runs_a, runs_b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
    common = runs_b[0][0]
    for ids, _ in runs_a + runs_b:
        common = np.intersect1d(common, ids)
    pairs = cooccurrence_pairs(data["events"][period], np.intersect1d(data["train_items"], common), min_rating)
    src, dst = positive_pairs(pairs, common, "embed", dataset=f"{period}_pairs")

    def hits(ids, x):            # (n_pairs,) hits of the two directions of each pair, summed
        r = ranks_of_positives(ids, x, np.concatenate([src, dst]), np.concatenate([dst, src]))
        return (r[:len(src)] <= k).astype(np.float64) + (r[len(src):] <= k)

    d = np.mean([hits(*r) for r in runs_a], axis=0) - np.mean([hits(*r) for r in runs_b], axis=0)
    rng = np.random.default_rng(seed)
    boot = np.array([d[rng.integers(0, len(d), len(d))].mean() / 2 for _ in range(n_boot)])
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"diff": float(d.mean() / 2), "lo": float(lo), "hi": float(hi), "pairs": int(len(d))}


def _baselines(cfg, data: dict, work: Path, names: tuple[str, ...] = ("base", "minilm")) -> dict:
    """{name: (item_ids, vectors)} of the baselines ``names`` (the base LLM, MiniLM), each embedded
    into ``work/<name>`` (resumable: a finished catalog is read back, not embedded again)."""
    from qarm_core.embed.embed import embed_catalog, embed_catalog_minilm
    from qarm_core.quantize.io import read_embeddings

    embed = {"base": lambda: embed_catalog(data["items"], work / "base", cfg.embed.model, cfg.embed.infer),
             "minilm": lambda: embed_catalog_minilm(data["items"], work / "minilm", cfg.embed.infer)}
    return {name: read_embeddings(embed[name]().path) for name in names}


RUN_FILE = "curve_run.json"      # in a run folder: what its training fingerprint was started with


def run_settings(run_dir: Path) -> dict:
    """An earlier curve's run folder: {"start_max_steps", "seed", "lr"} as its fingerprint holds them
    (``RUN_FILE``). Folders from before that file: ``start_max_steps`` from the last line of the
    training log (right for a run that one invocation trained to its end), seed and lr unknown (None)."""
    f = run_dir / RUN_FILE
    if f.exists():
        return json.loads(f.read_text())
    log = run_dir / "train_log.jsonl"
    if not log.exists():
        raise SystemExit(f"--continue-from {run_dir}: no train_log.jsonl there (not a run folder of this benchmark)")
    return {"start_max_steps": int(json.loads(log.read_text().strip().splitlines()[-1])["max_steps"]),
            "seed": None, "lr": None}


def learning_curve(cfg, data: dict, lr: float, max_steps: int, eval_every: int, work: Path,
                   on_row=lambda row: None, reference: tuple | None = None,
                   continue_from: Path | None = None, on_vectors=lambda step, ids, x: None) -> list[dict]:
    """Train with ``lr`` to ``max_steps``; every ``eval_every`` steps (and at the first step) score the
    model in memory. Returns one row per evaluation: step, training seconds so far, scores (each also
    handed to ``on_row`` as it is measured), and with ``reference`` (item_ids, vectors: MiniLM) the test
    recall@10 difference to it with its paired bootstrap 95% interval. ``continue_from``: an earlier
    curve's run folder (same config, seed, learning rate and snapshot: the run's fingerprint checks it)
    whose newest checkpoint the curve continues from; the learning rate does not depend on
    ``max_steps`` (warm-up only), so this equals one longer run, and the first row re-measures the
    earlier run's last one. Training seconds then count this invocation's steps only. ``on_vectors``
    gets (step, item_ids ``(n,)``, embeddings ``(n, dim)``) of every evaluation."""
    import numpy as np

    from qarm_core.embed.embed import encode_with_model
    from qarm_core.embed.data import item_texts
    from qarm_core.embed.train.distributed import training_dtype
    from qarm_core.embed.train.loop import run_steps, start_session

    # a checkpoint at every evaluation: a curve stopped part-way (a session's end) continues from its
    # last evaluation with ``--continue-from`` instead of from step 0
    tcfg = cfg.embed.train.model_copy(update={"lr": lr, "max_steps": max_steps, "max_seconds": None,
                                              "checkpoint_every": eval_every})
    tcfg = tcfg.model_copy(update={"dtype": training_dtype(tcfg).name})
    if continue_from is None:
        run_dir, first_cfg = Path(tempfile.mkdtemp(prefix=f"lr{lr:g}-", dir=work)), tcfg   # a fresh run
    else:
        start_max = run_settings(continue_from)["start_max_steps"]
        run_dir, first_cfg = continue_from, tcfg.model_copy(update={"max_steps": start_max})
    session = start_session(data["items"], data["judgments"], data["qa"], run_dir, cfg.embed.model, first_cfg)
    if continue_from is not None and session.start == 0:
        raise SystemExit(f"--continue-from {continue_from}: no checkpoint to continue from")
    # the fingerprint matched (start_session checks it): record what it was started with
    (run_dir / RUN_FILE).write_text(json.dumps({"start_max_steps": first_cfg.max_steps, "seed": tcfg.seed, "lr": lr}))
    print(f"lr {lr:g}: run folder {run_dir}, from step {session.start}", flush=True)
    ids = np.sort(data["items"]["item_id"].to_numpy().astype(np.int64))
    texts = item_texts(data["items"], cfg.embed.model, ids.tolist())
    rows, train_s, train_tokens, step = [], 0.0, 0, session.start
    while True:
        session.model.eval()
        with session.autocast:
            x = encode_with_model(session.loaded, cfg.embed.model, texts, ids.tolist(), cfg.embed.infer.batch_size,
                                  str(session.device))
        session.model.train()
        sc = _scores({"fine-tuned": (ids, x)}, data, cfg.events.positive_min_rating)["fine-tuned"]
        on_vectors(step, ids, x)
        rows.append({"lr": lr, "seed": tcfg.seed, "step": step, "train_seconds": round(train_s, 1),
                     "train_tokens_per_s": round(train_tokens / train_s, 1) if train_s > 0 else None, **{
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
        step, _, tokens, _ = run_steps(session, None)
        train_s += time.perf_counter() - t0
        train_tokens += tokens


def save_vectors(folder: Path, lr: float, seed: int, step: int, ids, x) -> Path:
    """One evaluated model's catalog embeddings (item_ids ``(n,)``, vectors ``(n, dim)``) as
    ``folder/lr{lr}-seed{seed}-step{step}.npz`` (written whole, then renamed)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"lr{lr:g}-seed{seed}-step{step}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, item_ids=np.asarray(ids), vectors=np.asarray(x, dtype=np.float32))
    tmp.replace(path)
    return path


def choose(rows: list[dict]) -> tuple[tuple[float, int], dict[tuple[float, int], float]]:
    """The (lr, step) with the highest validation recall@10 averaged over the runs (seeds) that
    measured it, among the (lr, step) that every seed measured (ties: fewer steps), and that mean
    for each such (lr, step). One run: its best row."""
    seeds = {r["seed"] for r in rows}
    by: dict[tuple[float, int], dict[int, float]] = {}
    for r in rows:
        by.setdefault((r["lr"], r["step"]), {})[r["seed"]] = r["valid.recall_at_10"]
    means = {key: sum(v.values()) / len(v) for key, v in by.items() if set(v) == seeds}
    return max(means, key=lambda key: (means[key], -key[1])), means


def main() -> None:
    from qarm_core.config import load_config
    from flows.options import parse_sets
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
    ap.add_argument("--continue-from", type=Path, nargs="+", default=[],
                    help="continue earlier curves from the newest checkpoint of their run folders (printed at "
                         "their start; each folder records its seed and learning rate, else --seed and one --lrs "
                         "apply), each to --max-steps; with several folders (seeds of one recipe) the step is "
                         "chosen on their mean validation recall and the test difference to MiniLM is also "
                         "given for their mean")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every curve, e.g. embed.train.freeze_layers=20 (repeatable)")
    ap.add_argument("--save-vectors", type=Path, default=None, metavar="DIR",
                    help="write every evaluated model's catalog embeddings to DIR as lr{lr}-seed{seed}-step{step}.npz "
                         "(item_ids, vectors), for benchmarks/compare_recipes.py")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "qarm_embed_budget"),
                    help="scratch folder (the baselines' embeddings are reused from here)")
    args = ap.parse_args()
    overrides = parse_sets(args.set)

    def config(seed: int | None):
        return load_config(args.config, {"home": args.home} | overrides
                           | ({"embed.train.seed": seed} if seed is not None else {}))

    cfg = config(args.seed)
    print(f"# {machine()}", flush=True)
    data = _published_inputs(cfg)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vectors = _baselines(cfg, data, work)
    base = _scores(vectors, data, cfg.events.positive_min_rating)
    rows: list[dict] = []
    models: dict[tuple[float, int, int], tuple] = {}       # (lr, step, seed) -> (item_ids, vectors)

    def keep(row: dict) -> None:    # written as measured: a stopped run keeps its curve so far
        rows.append(row)
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows, "baselines": base, "hardware": hardware_summary()},
                                                 indent=2))

    def remember(lr: float, step: int, seed: int, ids, x) -> None:
        models[(lr, step, seed)] = (ids, x)
        if args.save_vectors is not None:
            save_vectors(args.save_vectors, lr, seed, step, ids, x)

    lrs = [float(v) for v in args.lrs.split(",")]
    if args.continue_from:
        for run_dir in args.continue_from:
            st = run_settings(run_dir)
            if st["lr"] is None and len(lrs) != 1:
                raise SystemExit(f"--continue-from {run_dir}: the folder does not record its learning rate; give one in --lrs")
            lr = st["lr"] if st["lr"] is not None else lrs[0]
            run_cfg = config(st["seed"] if st["seed"] is not None else args.seed)
            learning_curve(run_cfg, data, lr, args.max_steps, args.eval_every, work, keep, reference=vectors["minilm"],
                           continue_from=run_dir,
                           on_vectors=lambda step, ids, x, lr=lr, s=run_cfg.embed.train.seed: remember(
                               lr, step, s, ids, x))
    else:
        for lr in lrs:
            learning_curve(cfg, data, lr, args.max_steps, args.eval_every, work, keep, reference=vectors["minilm"],
                           on_vectors=lambda step, ids, x, lr=lr: remember(lr, step, cfg.embed.train.seed, ids, x))
    (lr_best, step_best), means = choose(rows)
    seeds = sorted({r["seed"] for r in rows})
    print(f"\nsnapshot {data['snapshot']}; batch {cfg.embed.train.batch_size} pairs; overrides {overrides or 'none'}; "
          f"{hardware_summary()}")
    print(table(["lr", "seed", "step", "train s", "tokens/s", "valid R@10", "valid R@50", "valid MRR", "test R@10", "test R@50",
                 "test MRR", "test R@10 - MiniLM [95% CI]"],
                [[f"{r['lr']:g}", r["seed"], r["step"], r["train_seconds"], r.get("train_tokens_per_s") or "-",
                  *(f"{r[f'{p}.{k}']:.4f}" for p in ("valid", "test") for k in ("recall_at_10", "recall_at_50", "mrr")),
                  f"{r['test.r10_minus_ref']:+.4f} [{r['test.r10_minus_ref_lo']:+.4f}, {r['test.r10_minus_ref_hi']:+.4f}]"]
                 for r in rows]))
    print(table(["baseline", "valid R@10", "valid R@50", "valid MRR", "test R@10", "test R@50", "test MRR"],
                [[m, *(f"{d[p][k]:.4f}" for p in ("valid", "test") for k in ("recall_at_10", "recall_at_50", "mrr"))]
                 for m, d in base.items()]))
    m = base["minilm"]
    chosen = [r for r in rows if r["lr"] == lr_best and r["step"] == step_best]
    test_mean = sum(r["test.recall_at_10"] for r in chosen) / len(chosen)
    ci = recall_difference_ci([models[(lr_best, step_best, s)] for s in seeds], vectors["minilm"], data,
                              cfg.events.positive_min_rating)
    over = f"mean over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    print(f"\nchosen on validation ({over}: recall@10 {means[(lr_best, step_best)]:.4f}): lr {lr_best:g}, step "
          f"{step_best}: test recall@10 {test_mean:.4f} ({over}) vs MiniLM {m['test']['recall_at_10']:.4f} and base "
          f"{base['base']['test']['recall_at_10']:.4f}; beats both: "
          f"{test_mean > max(m['test']['recall_at_10'], base['base']['test']['recall_at_10'])}; difference to MiniLM "
          f"{ci['diff']:+.4f}, 95% paired bootstrap CI [{ci['lo']:+.4f}, {ci['hi']:+.4f}] ({ci['pairs']:,} test pairs)")


if __name__ == "__main__":
    main()
