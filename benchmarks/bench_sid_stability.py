"""Stable SIDs as a measured promise: seven synthetic days of the quantize stage as the daily and weekly
deployments run it, SID churn per day.

The world (seeded): items are points of a mixture of ``--clusters`` Gaussians on the unit sphere
(``--dim`` wide). Day 0 holds ``--items`` items. Each day the catalog grows by ``--growth`` (1%) and
the interactions shift: cluster popularity drifts (log-weights take a Gaussian step of
``--drift`` per day) and new items arrive in proportion to it, so the new items do not look like the
old ones. On a same-model day the embed stage carries unchanged items' vectors over (same model,
same text), so only the new items are new vectors; the quantizer warm-starts from the published
codebook with the published codes (``quantize.mode: warm_start``, the default), exactly
``quantize_stage`` as the flow calls it. On ``--retrain-day`` a retrained model embeds every item
again: the new space is a random rotation of the old one (nothing of the old coordinates carries
over) plus per-item noise of scale ``sigma`` relative to the spread inside a cluster (how far the
retrain moves items with respect to one another); the stage carries yesterday's cells into the new
space by their items, refits from there and matches labels to yesterday's codes (``quantize.lineage:
carry``, the default), or with ``--param lineage=reproject`` maps the new vectors onto the published
codebook's space by least squares, the day before's vectors being the published embeddings;
for comparison the day also runs a cold
refit (k-means++ from scratch), as is and matched to yesterday's codes afterwards by item overlap
(``lineage.align_to_previous``, the lineage of the previous session). ``--sigmas`` runs the retrain day once per value:
the noise is an assumption of the simulation, so the table shows churn as a function of it.

Churn = share of the items present yesterday whose SID changed; prefix churn = whose (c1, c2)
changed. Goals (issue 16): <= 1% on same-model days; <= 20% on the retrain day with the lineage
mapping. Prints one table; writes a PNG; logs one MLflow run (a nested run per day, step = day) to
the store of ``--home``.

    python benchmarks/bench_sid_stability.py                      # 50k items, 7 days (~1-2 min)
    python benchmarks/bench_sid_stability.py --items 2000 --levels 16,8 --clusters 64   # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import machine, table  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class World:
    """The synthetic catalog: cluster centres ``(clusters, dim)``, per-cluster spread, popularity
    log-weights that drift daily, and each item's cluster and point before normalisation (its
    model-0 vector is that point on the unit sphere)."""

    def __init__(self, clusters: int, dim: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.centers = self.rng.standard_normal((clusters, dim)).astype(np.float32)
        self.spread = self.rng.uniform(0.3, 0.8, clusters).astype(np.float32)
        self.log_w = np.zeros(clusters)
        self.cluster = np.zeros(0, np.int64)
        self.points = np.zeros((0, dim), np.float32)

    def add_items(self, n: int) -> None:
        w = np.exp(self.log_w - self.log_w.max())
        c = self.rng.choice(len(w), n, p=w / w.sum())
        p = self.centers[c] + self.spread[c, None] * self.rng.standard_normal((n, self.points.shape[1])).astype(np.float32)
        self.cluster = np.concatenate([self.cluster, c])
        self.points = np.concatenate([self.points, p])

    @property
    def x(self) -> np.ndarray:
        """The model-0 vectors ``(n, dim)``: the points on the unit sphere."""
        return _unit(self.points)

    def shift(self, drift: float) -> None:
        self.log_w += drift * self.rng.standard_normal(len(self.log_w))

    def retrained(self, sigma: float, seed: int) -> np.ndarray:
        """Every item's vector under a retrained model ``(n, dim)``: its point moved by ``sigma`` x its
        cluster's spread (sigma 1: as far again as items of one cluster lie apart), rotated into a
        new basis, on the unit sphere."""
        rng = np.random.default_rng([seed, 7])
        dim = self.points.shape[1]
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        noise = sigma * self.spread[self.cluster, None] * rng.standard_normal(self.points.shape).astype(np.float32)
        return _unit((self.points + noise) @ q.astype(np.float32))


def simulate(args: argparse.Namespace, progress=print) -> list[dict]:
    """One row per (day, sigma): what the quantize stage did and the churn it caused."""
    import yaml

    from qarm_core.quantize.lineage import align_to_previous
    from qarm_core.quantize.quantizer import QuantizerParams, quantize_embeddings
    from qarm_core.quantize.stage import CARRIED_OVER, REPROJECTED, quantize_stage

    params = QuantizerParams(levels=tuple(args.levels), fsq_dims=args.fsq_dims, fsq_levels=args.fsq_levels,
                             niter=args.niter, seed=args.seed, hr_sample=2000, decode_hr_sample=2000,
                             **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.param or [])})
    world = World(args.clusters, args.dim, args.seed)
    world.add_items(args.items)
    rows: list[dict] = []
    book = codes = published = None
    for day in range(args.days + 1):
        if day > 0:
            world.shift(args.drift)
            world.add_items(max(1, round(args.growth * len(world.points))))
        ids = np.arange(len(world.points), dtype=np.int64)
        retrain = day == args.retrain_day
        for sigma in (args.sigmas if retrain else [None]):
            t0 = time.perf_counter()
            x = world.retrained(sigma, args.seed) if retrain else world.x.copy()
            x_again = x.copy() if retrain else None          # quantize_stage uses x as its residual buffer
            x_published = x.copy() if not retrain else None  # what the embed stage would publish today
            new_book, new_codes, m, how = quantize_stage(
                x, ids, params, "warm_start", previous=book, previous_codes=codes,
                model_version="model-1" if retrain else "model-0",
                previous_vectors=(lambda want, p=published: p) if published is not None else None)
            row = {"day": day, "items": len(ids), "new_items": len(ids) - (0 if codes is None else codes.num_rows),
                   "model": "retrained" if retrain else "same", "sigma": sigma,
                   "how": ("re-projected" if how.endswith(REPROJECTED) else "carried over" if how.endswith(CARRIED_OVER)
                           else how.split(":")[0] if how.startswith("refit") else how),
                   "fsq_refit": m.get("fsq.refit", 0.0), "churn": m.get("churn"),
                   "prefix_churn": m.get("lineage.prefix_churn"),
                   "raw_collision": m.get("raw.collision_rate"), "hr1": m.get("raw.decode_hr@1"),
                   "seconds": time.perf_counter() - t0}
            if retrain:      # what the stage did before lineage carried cells over: a cold refit, matched after
                # on the day's vectors as embedded (the stage has used x as its buffer: residuals by now)
                cold_book, cold_codes, _ = quantize_embeddings(x_again.copy(), ids, params)
                _, _, cold = align_to_previous(cold_book, cold_codes, codes)
                row |= {"cold_churn": cold["lineage.churn_unaligned"], "cold_prefix_churn": cold["lineage.prefix_churn_unaligned"],
                        "cold_matched_churn": cold["churn"], "cold_matched_prefix_churn": cold["lineage.prefix_churn"]}
                # the next daily run on the same vectors (the new model reused): what it still moves
                _, _, after, _ = quantize_stage(x_again, ids, params, "warm_start", previous=new_book,
                                                previous_codes=new_codes, model_version="model-1")
                row["next_day_churn"] = after["churn"]
            if row["prefix_churn"] is None and codes is not None:     # same model: (c1, c2) changes
                prev = codes.select(["item_id", "c1", "c2"]).to_pydict()
                n_old = len(prev["item_id"])
                c1, c2 = new_codes["c1"].to_numpy()[:n_old], new_codes["c2"].to_numpy()[:n_old]
                row["prefix_churn"] = float(((c1 != np.asarray(prev["c1"])) | (c2 != np.asarray(prev["c2"]))).mean())
            rows.append(row)
            progress(f"day {day}{'' if sigma is None else f' (retrain, sigma {sigma})'}: {how.split(';')[0]}, "
                     f"churn {row['churn'] if row['churn'] is not None else '-'}, {row['seconds']:.1f} s")
        if not retrain:
            book, codes, published = new_book, new_codes, (ids, x_published, "model-0")
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def plot(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    daily = [r for r in rows if r["model"] == "same" and r["churn"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["day"] for r in daily], [100 * r["churn"] for r in daily], "o-", label="daily run (same model)")
    for r in (r for r in rows if r["model"] == "retrained"):
        ax.scatter([r["day"]], [100 * r["churn"]], marker="s", label=f"retrain, lineage (sigma {r['sigma']})")
        ax.scatter([r["day"]], [100 * r["cold_matched_churn"]], marker="x",
                   label=f"retrain, cold refit + matching (sigma {r['sigma']})")
    ax.axhline(1, color="grey", ls=":", lw=1)
    ax.axhline(20, color="grey", ls="--", lw=1)
    ax.set_xlabel("day")
    ax.set_ylabel("SID churn of existing items, %")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title(f"{args.items:,} items, +{args.growth:.0%}/day, levels {args.levels} + FSQ "
                 f"{args.fsq_levels}^{args.fsq_dims}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_mlflow(rows: list[dict], png: Path, args: argparse.Namespace) -> str:
    from qarm_core.config import load_config
    from tasks import tracking

    cfg = load_config(REPO / "configs" / "ml100k.yaml", {"home": str(args.home),
                                                         "tracking.experiment": "bench-sid-stability"}).resolved()
    with tracking.flow_run(cfg, "sid-stability", tags={"qarm.bench": "bench_sid_stability"}) as run_id:
        parent = tracking.run_handle(cfg, run_id)
        parent.params({"bench": {k: v for k, v in vars(args).items() if k != "home"}})
        for r in rows:
            name = f"day-{r['day']}" + ("" if r["sigma"] is None else f"-sigma-{r['sigma']}")
            with tracking.stage_run(cfg, run_id, name) as h:
                h.metrics({k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and v is not None},
                          step=r["day"])
                h.tags({"how": r["how"], "model": r["model"]})
        daily = [r for r in rows if r["model"] == "same" and r["churn"] is not None]
        for r in daily:
            parent.metrics({"daily.churn": r["churn"]}, step=r["day"])
        tracking.log_file(parent, png)
    return run_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=512)
    ap.add_argument("--levels", type=lambda s: [int(v) for v in s.split(",")], default=[128, 32])
    ap.add_argument("--fsq-dims", type=int, default=4)
    ap.add_argument("--fsq-levels", type=int, default=4)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--retrain-day", type=int, default=7)
    ap.add_argument("--growth", type=float, default=0.01)
    ap.add_argument("--drift", type=float, default=0.2)
    ap.add_argument("--sigmas", type=lambda s: [float(v) for v in s.split(",")], default=[0.1, 0.3, 0.6])
    ap.add_argument("--param", action="append", metavar="KEY=VALUE",
                    help="a quantizer setting other than its default, e.g. stickiness=0.05 (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--home", type=Path, default=REPO / "qarm_home", help="its MLflow store gets the run")
    ap.add_argument("--png", type=Path, default=None, help="default: <home>/reports/sid_stability.png")
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args(argv)
    if not 1 <= args.retrain_day <= args.days:
        ap.error(f"--retrain-day must be in 1..{args.days}")
    print(machine())
    rows = simulate(args)
    head = ["day", "items", "new", "model", "sigma", "quantize", "FSQ refit", "churn", "prefix churn",
            "cold refit: churn", "prefix", "cold refit + matching: churn", "prefix", "next day, same vectors: churn",
            "raw collision", "s"]
    print(table(head, [[r["day"], f"{r['items']:,}", f"{r['new_items']:,}", r["model"], _fmt(r["sigma"]), r["how"],
                        int(r["fsq_refit"]), _fmt(r["churn"]), _fmt(r["prefix_churn"]), _fmt(r.get("cold_churn")),
                        _fmt(r.get("cold_prefix_churn")), _fmt(r.get("cold_matched_churn")),
                        _fmt(r.get("cold_matched_prefix_churn")), _fmt(r.get("next_day_churn")),
                        _fmt(r["raw_collision"]), f"{r['seconds']:.1f}"]
                       for r in rows]))
    daily = [r["churn"] for r in rows if r["model"] == "same" and r["churn"] is not None]
    print(f"same-model days: churn max {max(daily):.4f}, mean {np.mean(daily):.4f} (goal <= 0.01)")
    for r in (r for r in rows if r["model"] == "retrained"):
        print(f"retrain day, sigma {r['sigma']}: churn {r['churn']:.4f} with the lineage ({r['how']}), "
              f"{r['cold_matched_churn']:.4f} for a cold refit matched afterwards, "
              f"{r['cold_churn']:.4f} unmatched (goal <= 0.20); prefix {r['prefix_churn']:.4f} / "
              f"{r['cold_matched_prefix_churn']:.4f} / {r['cold_prefix_churn']:.4f}")
    png = args.png or args.home / "reports" / "sid_stability.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, png, args)
    print(f"plot: {png}")
    if not args.no_mlflow:
        print(f"mlflow: run {log_to_mlflow(rows, png, args)} in {args.home}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
