"""SID churn of a real weekly retrain: what `bench_sid_stability.py` can only assume (how far a
retrain moves items), measured on the published ML-100K snapshot.

Reads the current snapshot of ``--home`` (made by `make run`), then does what the weekly deployment
does (`embed.train.init_from: published`): continues fine-tuning the published model for
``--steps`` steps on the snapshot's judged pairs and QA, embeds the catalog with the new model, and
runs the quantize stage against the published codebook and codes (a new model version: cells carried
into the new space by their items, refitted, labels matched to the old codes). For comparison it
also fits the codebook cold (k-means++ from scratch) and matches it to the old codes afterwards.

Churn = share of the published items whose SID changed; prefix churn = whose (c1, c2) changed. The
issue's goal: <= 20% on the retrain day with the lineage mapping.

How far the retrain moved the items, in the simulation's terms: both spaces are centred and scaled,
the new vectors are rotated onto the old ones (orthogonal Procrustes: a change of basis, a shift or a
uniform scaling moves no item relative to the others) and the residual's RMS length is divided by the
RMS distance of the old vectors to their level-1 cell's mean (``movement``). The same
statistic on the simulation's world for its sigmas (``--sim-sigmas``) places the real retrain on the
simulation's axis.

Caveat printed with the table: the retrain here sees the same pairs as the published model (no new
day of data), so it moves items less than a weekly retrain on a week of new pairs would.

    python benchmarks/bench_retrain_churn.py                  # ./qarm_home, 40 steps (~10 min on 2 cores)
    python benchmarks/bench_retrain_churn.py --steps 10 --set embed.train.lr=1e-5
    python benchmarks/bench_retrain_churn.py --set embed.train.stability_weight=10
    python benchmarks/bench_retrain_churn.py --steps 800 --save-vectors /tmp/vecs.npz   # the weekly budget

Every set of codes is also scored in the retrained model's own space (``fidelity``: the share of the
new vectors' variance left inside level-1 cells, and how many of an item's 10 nearest items share its
c1), since decode HR@1 is measured in each lineage's own space (native vectors when carried, mapped
ones when re-projected, the old model's for the published codes) and so does not compare them.
``--save-vectors`` keeps a retrain's vectors, ``--load-vectors`` sweeps settings on them without
training again.

The stage's two ways of following a new model are both run: ``quantize.lineage: carry`` (the
default: the cells carried over by their items) and ``reproject`` (the new vectors mapped onto the
published codebook's space by least squares). "Movement" is also given after that affine map instead of
the rotation alone: the part of the change a linear map cannot take out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import machine, table  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def movement(old: np.ndarray, new: np.ndarray, cells: np.ndarray, rotate: bool = True) -> float:
    """How far ``new`` ``(n, d)`` moved items from ``old`` ``(n, d)`` (rows = the same items), up to
    what k-means does not see: each space is centred and scaled to unit RMS deviation (a shift or a
    uniform scaling moves no item relative to the others), then ``new`` is rotated onto ``old``
    (orthogonal Procrustes). Returns the residual's RMS length over the RMS distance of the old rows
    to the mean of their cell (``cells`` ``(n,)``). ``rotate=False``: no rotation (``new`` already
    in ``old``'s coordinates)."""
    if new.shape != old.shape:
        raise ValueError(f"shapes differ: {new.shape} vs {old.shape}")

    def standard(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.mean(0)
        return x / np.sqrt((x ** 2).sum(1).mean())

    a, b = standard(old), standard(new)
    if rotate:
        u, _, vt = np.linalg.svd(b.T @ a)
        b = b @ (u @ vt)
    resid = b - a
    means = np.zeros_like(a)
    for c in np.unique(cells):
        m = cells == c
        means[m] = a[m].mean(0)
    spread = np.sqrt(((a - means) ** 2).sum(1).mean())
    return float(np.sqrt((resid ** 2).sum(1).mean()) / spread)


def nearest(x: np.ndarray, k: int = 10) -> np.ndarray:
    """``(n, k)``: each row's ``k`` nearest other rows of ``x`` ``(n, d)`` by inner product (ties by
    index). O(n^2) memory: a benchmark's catalog."""
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def fidelity(x: np.ndarray, item_ids: np.ndarray, codes: "pa.Table", near: np.ndarray) -> dict[str, float]:
    """How well a CODES table's cells describe the space of ``x`` ``(n, d)`` (rows: ``item_ids``
    ``(n,)``, every one in ``codes``), whatever space the codes were fitted in: the share of the
    rows' total variance left inside level-1 cells (``within_c1``) and inside (c1, c2) cells
    (``within_c12``), and the share of each row's nearest rows ``near`` ``(n, k)`` (``nearest(x)``,
    computed once for every set of codes) that hold its c1 (``knn_c1``) and its (c1, c2)
    (``knn_c12``). Lower spread and higher sharing: SIDs that group the items this space puts
    together."""
    shared, at_x, at_codes = np.intersect1d(item_ids, codes["item_id"].to_numpy(), assume_unique=True,
                                            return_indices=True)
    if len(shared) != len(item_ids):
        raise ValueError(f"fidelity: {len(item_ids) - len(shared)} items have no code")
    c1, c2 = np.empty(len(item_ids), np.int64), np.empty(len(item_ids), np.int64)
    c1[at_x] = codes["c1"].to_numpy()[at_codes]
    c2[at_x] = codes["c2"].to_numpy()[at_codes]
    x = x.astype(np.float64)
    total = ((x - x.mean(0)) ** 2).sum()
    out = {}
    for name, cell in (("c1", c1), ("c12", c1 * (int(c2.max(initial=0)) + 1) + c2)):
        _, inv = np.unique(cell, return_inverse=True)
        sums = np.zeros((inv.max(initial=-1) + 1, x.shape[1]))
        np.add.at(sums, inv, x)
        means = sums / np.bincount(inv)[:, None]
        out[f"within_{name}"] = float(((x - means[inv]) ** 2).sum() / total)
        out[f"knn_{name}"] = float((cell[near] == cell[:, None]).mean())
    return out


def sim_movement(sigmas: list[float], items: int, levels: tuple[int, ...], seed: int = 0) -> dict[float, float]:
    """``movement`` on bench_sid_stability's world (its defaults: 512 clusters, 64-d) for each sigma,
    with the cells of a codebook fitted as on its day 0."""
    from benchmarks.bench_sid_stability import World
    from qarm_core.quantize.quantizer import QuantizerParams, quantize_embeddings

    world = World(512, 64, seed)
    world.add_items(items)
    x0 = world.x.copy()
    _, codes, _ = quantize_embeddings(x0.copy(), np.arange(items, dtype=np.int64),
                                      QuantizerParams(levels=levels, fsq_dims=4, fsq_levels=4, seed=seed,
                                                      hr_sample=100, decode_hr_sample=100))
    cells = codes["c1"].to_numpy()
    return {s: movement(x0, world.retrained(s, seed), cells) for s in sigmas}


def _value(text: str):
    """A --set value: YAML, with numbers such as 1e-5 (a string to YAML 1.1) read as numbers."""
    import yaml

    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def _retrain(snap, cfg, steps: int, overrides: dict) -> tuple[np.ndarray, np.ndarray, str, str]:
    """What the weekly deployment does: continue the published model for ``steps`` steps on the
    snapshot's judged pairs and QA, embed the catalog with it. Returns (item ids (n,), vectors
    (n, dim), the new model version, a summary of the retrain and both models' validation recall)."""
    from qarm_core.embed.embed import embed_catalog
    from qarm_core.embed.stage import score_embeddings, train_stage, validation_pairs
    from qarm_core.quantize.io import read_embeddings
    from qarm_core.storage import read_dataset

    items, judgments, qa = (read_dataset(snap.record(n)) for n in ("items", "judgments", "qa"))
    model_cfg = cfg.embed.model.model_copy(update={"model": snap.record("model").path})
    train_cfg = cfg.embed.train.model_copy(update={"max_steps": steps, "max_seconds": None,
                                                   "anneal_steps": min(cfg.embed.train.anneal_steps, steps)})
    with tempfile.TemporaryDirectory(prefix="retrain-churn-") as tmp:
        t0 = time.perf_counter()
        # as the train task does: the published embeddings anchor the stability term when it is weighted
        reference = read_dataset(snap.record("embeddings"), columns=["item_id", "vector"]) \
            if train_cfg.stability_weight else None
        rec = train_stage(items, judgments, qa, cfg.embed.model_copy(update={"model": model_cfg, "train": train_cfg}),
                          Path(tmp) / "train", reference=reference)
        train_s = time.perf_counter() - t0
        emb = embed_catalog(items, Path(tmp) / "emb", model_cfg.model_copy(update={"model": rec.model_dir}),
                            cfg.embed.infer)
        ids1, x1 = read_embeddings(emb.path)
        pairs, why = validation_pairs(items, read_dataset(snap.record("train_events")),
                                      read_dataset(snap.record("valid_events")), cfg.events.positive_min_rating)
        recall = score_embeddings({"published": snap.record("embeddings").path, "retrained": emb.path}, pairs,
                                  cfg.embed.eval_k) if pairs is not None else {}
    k = cfg.embed.eval_k
    summary = (f"retrain: {rec.steps} steps from the published model in {train_s:.0f} s ({rec.tokens_per_s:.0f} "
               f"tokens/s, {rec.dtype}); overrides {overrides or 'none'}; new model {rec.model_version}\n"
               "validation recall@%d: published %s, retrained %s" % (
                   k, *(f"{recall[f'valid.{m}.recall_at_{k}']:.4f}" if recall else why
                        for m in ("published", "retrained"))))
    return ids1, x1, emb.model_version, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "ml100k.yaml"))
    ap.add_argument("--home", default=None, help="QARM_HOME with a published snapshot (default: the config's)")
    ap.add_argument("--steps", type=int, default=None, help="retrain steps (default: the config's max_steps)")
    ap.add_argument("--sim-sigmas", type=lambda s: [float(v) for v in s.split(",")], default=[0.1, 0.3, 0.6])
    ap.add_argument("--sim-items", type=int, default=50_000)
    ap.add_argument("--stickiness", type=_floats, default=None,
                    help="quantize.stickiness values to try on the retrain day, e.g. 0.05,0.5,1 (default: the config's)")
    ap.add_argument("--fsq-margin", type=_floats, default=None,
                    help="quantize.fsq_margin values to try on the retrain day, e.g. 0.5,1,2 (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the retrain, e.g. embed.train.lr=1e-5 (repeatable)")
    ap.add_argument("--lineages", type=lambda v: v.split(","), default=["carry", "reproject"],
                    help="quantize.lineage values of the settings sweep (default: both)")
    ap.add_argument("--load-vectors", default=None, metavar="NPZ",
                    help="skip the retrain: read its vectors from an earlier run's --save-vectors file")
    ap.add_argument("--save-vectors", default=None, metavar="NPZ",
                    help="also write the item ids, the published and the retrained vectors there (for --load-vectors)")
    args = ap.parse_args(argv)
    if args.load_vectors and (args.steps or any(kv.startswith("embed.") for kv in args.set)):
        ap.error("--steps and --set embed.* change the retrain, which --load-vectors does not run")
    if bad := sorted(set(args.lineages) - {"carry", "reproject"}):
        ap.error(f"--lineages: unknown {bad}; known: carry, reproject")
    overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}

    from qarm_core.config import load_config
    from qarm_core.quantize.io import read_embeddings, read_model_version
    from qarm_core.quantize.lineage import align_to_previous, apply_input_map, fit_input_map
    from qarm_core.quantize.quantizer import load_codebook, quantize_embeddings
    from qarm_core.quantize.stage import quantize_stage
    from qarm_core.storage import Storage, read_dataset

    cfg = load_config(args.config, ({"home": args.home} if args.home else {}) | overrides).resolved()
    snap = Storage(cfg.home).current()
    if snap is None:
        raise SystemExit(f"bench_retrain_churn: no published snapshot in {cfg.home}; run `make run` first")
    print(f"# {machine()}", flush=True)
    book0 = load_codebook(snap.record("codebook").path)
    codes0 = read_dataset(snap.record("codes"))
    ids0, x0 = read_embeddings(snap.record("embeddings").path)
    steps = args.steps or cfg.embed.train.max_steps
    if args.load_vectors:
        saved = np.load(args.load_vectors)
        ids1, x1, new_version = saved["ids"], saved["new"], str(saved["model_version"])
        summary = str(saved["summary"])
        if not np.array_equal(saved["old"], x0):
            raise SystemExit(f"bench_retrain_churn: {args.load_vectors} holds another snapshot's published vectors")
    else:
        ids1, x1, new_version, summary = _retrain(snap, cfg, steps, overrides)
    if not np.array_equal(ids0, ids1):
        raise SystemExit("bench_retrain_churn: the new embeddings cover other items than the published ones")
    if args.save_vectors:
        np.savez(args.save_vectors, ids=ids0, old=x0, new=x1, model_version=new_version, summary=summary)
    params = cfg.quantize.params()

    def published_vectors(want: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:  # as the task reads them
        return (*read_embeddings(snap.record("embeddings").path, only=want),
                read_model_version(snap.record("embeddings").path))

    _, codes_a, m, how = quantize_stage(x1.copy(), ids1, params, "warm_start", book0, codes0,
                                        model_version=new_version, previous_vectors=published_vectors)
    other = "carry" if params.lineage == "reproject" else "reproject"
    _, codes_b, m_other, how_other = quantize_stage(x1.copy(), ids1, params.model_copy(update={"lineage": other}),
                                              "warm_start", book0, codes0, model_version=new_version,
                                              previous_vectors=published_vectors)
    # the retrain day's trade: how much an item's old cell may be farther than its nearest (stickiness)
    # and how far outside its old FSQ bin it may lie (fsq_margin) before its SID moves, against what
    # the SIDs then decode to
    near = nearest(x1)
    trade = []
    for lineage in args.lineages:
        for stick in args.stickiness or [params.stickiness]:
            for margin in args.fsq_margin or [params.fsq_margin]:
                q = params.model_copy(update={"lineage": lineage, "stickiness": stick, "fsq_margin": margin})
                book_q, codes_q, mq, _ = quantize_stage(x1.copy(), ids1, q, "warm_start", book0, codes0,
                                                        model_version=new_version,
                                                        previous_vectors=published_vectors)
                # the next daily run (same model, same vectors, the config's own settings): does it
                # keep what the retrain day kept, or move the held items then?
                _, _, m_next, _ = quantize_stage(x1.copy(), ids1, params, "warm_start", book_q, codes_q,
                                                 model_version=new_version)
                f = fidelity(x1, ids1, codes_q, near)
                trade.append([lineage, stick, margin, f"{mq['churn']:.4f}", f"{mq['lineage.prefix_churn']:.4f}",
                              f"{f['within_c1']:.3f}", f"{f['knn_c1']:.3f}", f"{mq['raw.decode_hr@1']:.4f}",
                              f"{mq['raw.collision_rate']:.4f}", f"{m_next['churn']:.4f}"])
    cold_book, cold_codes, _ = quantize_embeddings(x1.copy(), ids1, params)
    _, cold_aligned, cold = align_to_previous(cold_book, cold_codes, codes0)
    order = np.argsort(codes0["item_id"].to_numpy())
    cells = codes0["c1"].to_numpy()[order][np.searchsorted(codes0["item_id"].to_numpy()[order], ids0)]
    moved = movement(x0, x1, cells)
    moved_affine = movement(x0, apply_input_map(x1, fit_input_map(x1, x0)[0]), cells, rotate=False)
    sims = sim_movement(args.sim_sigmas, args.sim_items, (128, 32))

    print(summary + (f"\n(the retrained vectors read from {args.load_vectors})" if args.load_vectors else ""))
    names = {"reproject": "lineage: re-projected onto the published space, refitted",
             "carry": "lineage: cells carried over by their items, refitted, matched"}
    print(f"the stage ({params.lineage}): {how}\nthe other way ({other}): {how_other}")
    published = json.loads((Path(snap.record("codebook").path) / "metrics.json").read_text())

    def described(codes) -> list[str]:
        f = fidelity(x1, ids1, codes, near)
        return [f"{f['within_c1']:.3f}", f"{f['knn_c1']:.3f}"]

    print(table(["what", "SID churn", "(c1, c2) churn", "within-c1 spread", "10-NN sharing c1",
                 "decode HR@1 (own space)", "raw collision"], [
        [f"{names[params.lineage]} (the stage's)", f"{m['churn']:.4f}", f"{m['lineage.prefix_churn']:.4f}",
         *described(codes_a), f"{m['raw.decode_hr@1']:.4f}", f"{m['raw.collision_rate']:.4f}"],
        [names[other], f"{m_other['churn']:.4f}", f"{m_other['lineage.prefix_churn']:.4f}",
         *described(codes_b), f"{m_other['raw.decode_hr@1']:.4f}", f"{m_other['raw.collision_rate']:.4f}"],
        ["cold refit, matched afterwards", f"{cold['churn']:.4f}", f"{cold['lineage.prefix_churn']:.4f}",
         *described(cold_aligned), "", ""],
        ["cold refit, as is", f"{cold['lineage.churn_unaligned']:.4f}", f"{cold['lineage.prefix_churn_unaligned']:.4f}",
         "", "", "", ""],
        ["the published codes kept as they are", "0", "0", *described(codes0),
         f"{published['raw.decode_hr@1']:.4f} (old space)", f"{published['raw.collision_rate']:.4f}"],
    ]))
    print("(within-c1 spread / 10-NN sharing c1, in the retrained model's space: the share of the retrained vectors' variance left inside level-1 cells, and of each item's "
          "10 nearest items by inner product that hold its c1; the same measure for every row, whatever space its "
          "codes were fitted in. Decode HR@1 is measured in each row's own space: the native vectors when carried, "
          "the mapped ones when re-projected, the old model's for the published codes.)")
    print(f"\nthe retrain day's quantize with other settings ({len(ids1):,} items):")
    print(table(["lineage", "stickiness", "fsq_margin", "SID churn", "(c1, c2) churn", "within-c1 spread",
                 "10-NN sharing c1", "decode HR@1 (own space)", "raw collision",
                 f"next daily run's churn (stickiness {params.stickiness:g})"], trade))
    print(f"\nmovement of the real retrain (Procrustes residual / level-1 cell spread, {len(ids0):,} items): "
          f"{moved:.3f}; after the affine map of least squares instead: {moved_affine:.3f}")
    print(table(["simulation sigma", "movement (same statistic, 128 x 32 cells, "
                 f"{args.sim_items:,} items)"], [[s, f"{v:.3f}"] for s, v in sims.items()]))
    print("\ncaveat: the retrain saw the published model's own pairs and QA (no new day of data), so it moves "
          "items less than a weekly retrain on a week of new pairs would.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
