"""The pictures every refresh logs: how the Semantic IDs fill their code space, how the judge's
scores fall per source, how training's loss went. Each function takes plain arrays or tables and
writes one PNG (matplotlib, Agg backend); none reads or logs anything itself."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def code_levels(codes: pa.Table) -> list[np.ndarray]:
    """The raw code of each level, ``[c1, c2, c3]``, each ``(n_items,)`` int64."""
    missing = [c for c in ("c1", "c2", "c3") if c not in codes.column_names]
    if missing:
        raise ValueError(f"codes table lacks columns {missing}")
    return [codes[c].to_numpy().astype(np.int64) for c in ("c1", "c2", "c3")]


def collision_by_level(levels: Sequence[np.ndarray]) -> list[float]:
    """Share of items whose code prefix up to level l (1-based: (c1), (c1, c2), (c1, c2, c3)) is
    shared with another item; ``len(levels)`` values, non-decreasing towards level 1."""
    out = []
    n = len(levels[0])
    for depth in range(1, len(levels) + 1):
        prefix = np.stack(levels[:depth], axis=1)
        _, inverse, counts = np.unique(prefix, axis=0, return_inverse=True, return_counts=True)
        out.append(float((counts[inverse.ravel()] > 1).sum() / n) if n else 0.0)
    return out


def plot_codes(codes: pa.Table, code_sizes: Sequence[int], path: str | Path,
               raw_collision: float | None = None) -> Path:
    """One PNG, four panels: items per code of each level (sorted, with the share of codes used),
    items per (c1, c2) cell (the k-means leaves the FSQ level splits), items per SID as quantised
    (c1, c2, c3_raw: what resolution then spreads; EdgeNum is its mean), and the collision share by
    level. ``codes`` are the published codes, after collision resolution (its c3 is unique within a
    cell), so the full SID's raw collision (before resolution) comes in as ``raw_collision``; without
    a ``c3_raw`` column the third panel shows the published (c1, c2, c3)."""
    plt = _pyplot()
    levels = code_levels(codes)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for i, (lv, size) in enumerate(zip(levels, code_sizes)):
        counts = np.sort(np.bincount(lv, minlength=int(size)))[::-1]
        used = (counts > 0).mean()
        axes[0].plot(np.arange(1, len(counts) + 1), np.maximum(counts, 0.5), label=f"level {i + 1}: {used:.0%} of {size:,} used")
    axes[0].set(xscale="log", yscale="log", xlabel="code rank", ylabel="items (0 drawn at 0.5)",
                title="items per code, by level")
    axes[0].legend(fontsize=8)
    _, per_cell = np.unique(np.stack(levels[:2], axis=1), axis=0, return_counts=True)
    axes[1].hist(per_cell, bins=np.arange(1, int(per_cell.max()) + 2) - 0.5)
    axes[1].set(xlabel="items in a (c1, c2) cell", ylabel="cells",
                title=f"items per (c1, c2) cell ({len(per_cell):,} of {code_sizes[0] * code_sizes[1]:,} cells used)")
    raw = "c3_raw" in codes.column_names
    c3 = codes["c3_raw"].to_numpy().astype(np.int64) if raw else levels[2]
    _, per_sid = np.unique(np.stack([levels[0], levels[1], c3], axis=1), axis=0, return_counts=True)
    axes[2].hist(per_sid, bins=np.arange(1, int(per_sid.max()) + 2) - 0.5, log=True)
    axes[2].set(xlabel="items holding one SID" + (" (as quantised)" if raw else ""), ylabel="SIDs (log)",
                title=f"items per SID: EdgeNum {len(levels[0]) / max(len(per_sid), 1):.2f}, max {int(per_sid.max())}")
    coll = collision_by_level(levels)
    names = ["c1", "c1, c2"] + (["c1..c3 raw"] if raw_collision is not None else []) + ["c1..c3 published"]
    values = coll[:2] + ([raw_collision] if raw_collision is not None else []) + coll[2:]
    axes[3].bar(names, values)
    for x, v in enumerate(values):
        axes[3].text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    axes[3].set(ylim=(0, 1.05), ylabel="share of items", title="collision by level (prefix shared)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_judge_scores(judgments: pa.Table, path: str | Path, thresholds: Mapping[str, float] | None = None) -> Path:
    """Histogram of the judge's scores per pair source (``source``, ``score``, ``keep`` columns), with
    the kept share and, where given, each source's keep threshold."""
    plt = _pyplot()
    sources = sorted(set(judgments["source"].to_pylist()))
    fig, axes = plt.subplots(1, max(len(sources), 1), figsize=(5 * max(len(sources), 1), 3.6), squeeze=False)
    score = judgments["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    keep = judgments["keep"].to_numpy(zero_copy_only=False).astype(bool)
    src = np.array(judgments["source"].to_pylist(), dtype=object)
    for ax, s in zip(axes[0], sources):
        m = src == s
        finite = np.isfinite(score[m])
        ax.hist([score[m][finite & keep[m]], score[m][finite & ~keep[m]]], bins=40, stacked=True,
                label=["kept", "rejected"])
        if thresholds and s in thresholds and np.isfinite(thresholds[s]):
            ax.axvline(thresholds[s], color="k", linestyle="--", linewidth=1, label="threshold")
        ax.set(xlabel="judge score", ylabel="pairs", title=f"{s}: {int(m.sum()):,} pairs, {keep[m].mean():.0%} kept")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path,
                     title: str = "training loss") -> Path:
    """Each named curve as (step, value) points on one axis (e.g. ``loss``, ``nce``, ``qa``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="." if len(points) < 50 else None, label=name)
    ax.set(xlabel="step", ylabel="value", title=title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
