"""Train every model on the same data, budget and seeds; a comparison table and per-epoch curves.

The table reports, per model, the mean and the sample standard deviation (ddof=1; 0 for one seed) of
test AUC, GAUC and logloss over the seeds, and the training throughput.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qarm_core.rank.config import RankConfig
from qarm_core.rank.data import RankData
from qarm_core.rank.train import RunResult, train_model

METRICS = ("auc", "gauc", "logloss")


@dataclass
class Comparison:
    table: list[dict]                                   # one row per model (see ``summarize``)
    curves: dict[str, list[list[dict]]]                 # model -> per seed -> per epoch
    runs: list[RunResult] = field(default_factory=list)


def summarize(name: str, runs: list[RunResult]) -> dict:
    """One table row: model, seeds, ``<metric>_mean``/``<metric>_std`` for AUC, GAUC, logloss,
    per-seed AUCs, training samples/s (mean), parameters."""
    row: dict = {"model": name, "seeds": len(runs)}
    for m in METRICS:
        v = np.array([r.metrics[m] for r in runs], dtype=np.float64)
        row[f"{m}_mean"] = float(v.mean())
        row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    row["auc_per_seed"] = [round(r.metrics["auc"], 5) for r in runs]
    row["train_samples_per_s"] = float(np.mean([r.train_samples_per_s for r in runs]))
    row["n_params"] = runs[0].n_params
    return row


def compare(data: RankData, cfg: RankConfig, models: list[str] | None = None,
            on_model: Callable[[str, list[RunResult], dict], None] | None = None,
            on_epoch: Callable[[str, int, dict], None] | None = None) -> Comparison:
    """Train each model on each of ``cfg.train.seeds``; ``on_model(name, runs, row)`` is called as
    each model finishes (the flow logs it to MLflow there), ``on_epoch(name, seed, point)`` per epoch."""
    table, curves, all_runs = [], {}, []
    for name in models or cfg.models:
        runs = []
        for seed in cfg.train.seeds:
            cb = (lambda p, n=name, s=seed: on_epoch(n, s, p)) if on_epoch else None
            runs.append(train_model(name, data, cfg, seed, on_epoch=cb))
        row = summarize(name, runs)
        table.append(row)
        curves[name] = [r.curves for r in runs]
        all_runs += runs
        if on_model:
            on_model(name, runs, row)
    return Comparison(table, curves, all_runs)


def format_table(table: list[dict], baseline: str | None = "din") -> list[list[str]]:
    """Rows of strings: model, AUC mean ± std, GAUC mean ± std, logloss, delta AUC vs ``baseline`` (points)."""
    base = next((r for r in table if r["model"] == baseline), None)
    out = []
    for r in table:
        delta = "" if base is None else f"{100 * (r['auc_mean'] - base['auc_mean']):+.2f}"
        out.append([r["model"], f"{r['auc_mean']:.4f} ± {r['auc_std']:.4f}", f"{r['gauc_mean']:.4f} ± {r['gauc_std']:.4f}",
                    f"{r['logloss_mean']:.4f} ± {r['logloss_std']:.4f}", delta, f"{r['train_samples_per_s']:,.0f}"])
    return out


TABLE_HEADERS = ["model", "AUC", "GAUC", "logloss", "ΔAUC vs DIN (pts)", "train samples/s"]


def plot_curves(curves: dict[str, list[list[dict]]], path: str | Path,
                metrics: tuple[str, ...] = ("train_loss", "test_auc", "test_gauc", "test_logloss")) -> Path:
    """Per-epoch curves (one line per model and seed) as a PNG; needs matplotlib (imported lazily)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    axes = np.atleast_1d(axes)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, metrics):
        for i, (name, per_seed) in enumerate(curves.items()):
            for j, pts in enumerate(per_seed):
                ax.plot([p["epoch"] for p in pts], [p[metric] for p in pts], marker="o", ms=3,
                        color=colours[i % len(colours)], alpha=0.8, label=name if j == 0 else None)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
