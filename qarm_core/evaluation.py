"""The whole evaluation of a published snapshot on the held-out periods, as tables and plots.

Each ``*_table`` function is pure (arrays and tables in, rows out) and reads the test period only to
report; ``render_report`` turns the sections into ``report.md``. The ``evaluate`` flow wires them:

* **embeddings**: recall@10/50 and MRR of future co-occurrence (``embed.evaluate.cooccurrence_pairs``
  of the validation and test periods, among training items) for the published (fine-tuned) model,
  the base model and MiniLM;
* **judge**: per source, the judge score's AUC on test-period labels of the mined pairs
  (``judge.calibrate.future_labels``), the measured rejection rate beside QARM V2's, and an ablation
  (LLM term alone, embedding terms alone, the mix) on the judge's evaluation pairs labelled by the
  test period;
* **quantizer**: raw collision and decode HR@1/HR@10 of residual k-means alone against residual
  k-means + FSQ at equal code space, over seeds, on the published embeddings;
* **ranking**: the ``rank.compare`` table (validation-chosen settings, test AUC/GAUC, paired
  bootstrap CI against the best baseline), rendered here; with ``--pool-with``, also the comparison
  pooled with earlier ones on the same samples (``rank.compare.pool_comparisons``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from qarm_core.arrays import intersect

STAGE = "evaluate"

# QARM V2's reported rejection rates (share of mined pairs the LLM judged to be noise).
PAPER_REJECTION = {"swing": "> 10%", "u2i": "> 70%"}


def _pairs_cell(row: dict) -> str:
    """The pairs scored, and of how many when they were a sample."""
    total = row.get("pairs_total", row["pairs"])
    return f"{row['pairs']:,} of {total:,} (sample)" if total > row["pairs"] else f"{row['pairs']:,}"


def embedding_table(embeddings: dict[str, tuple[np.ndarray, np.ndarray]], train_items: np.ndarray,
                    periods: dict[str, pa.Table], min_rating: float | None, ks: tuple[int, ...] = (10, 50),
                    max_pairs: int | None = None) -> list[dict]:
    """One row per (period, model): pairs, recall@k, MRR. ``embeddings``: model -> (item_ids (n,),
    vectors (n, d)); ``periods``: period name -> its events. Pairs are limited to items every model
    embeds, so all models answer the same queries; with ``max_pairs``, to that many of them per period
    (``embed.evaluate.sample_pairs``; the row's ``pairs_total`` says how many there were)."""
    from qarm_core.embed.evaluate import cooccurrence_pairs, recall_report, sample_pairs

    common = None
    for ids, _ in embeddings.values():
        common = ids if common is None else intersect(common, ids)
    rows = []
    for period, events in periods.items():
        pairs, total = sample_pairs(cooccurrence_pairs(events, intersect(np.asarray(train_items), common), min_rating),
                                    max_pairs)
        for model, (ids, x) in embeddings.items():
            if pairs.num_rows == 0:
                rows.append({"period": period, "model": model, "pairs": 0, "pairs_total": 0})
                continue
            r = recall_report(ids, x, pairs, ks)
            rows.append({"period": period, "model": model, "pairs": pairs.num_rows, "pairs_total": total,
                         **{k: v for k, v in r.items() if k != "queries"}})
    return rows


def judge_table(judgments: pa.Table, test_events: pa.Table, min_rating: float | None) -> list[dict]:
    """Per source: pairs, measured rejection rate (1 - keep rate) beside the paper's, and the judge
    score's AUC on the test period's labels of the mined pairs (labelled / related counts)."""
    from qarm_core.judge.calibrate import future_labels
    from qarm_core.rank.metrics import auc

    labels = future_labels(judgments, test_events, min_rating)
    source = np.asarray(judgments["source"].to_pylist(), dtype=object)
    keep = judgments["keep"].to_numpy(zero_copy_only=False)
    score = judgments["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    rows = []
    for s in sorted(set(source.tolist())):
        m = source == s
        lab = m & (labels >= 0)
        y = labels[lab]
        row = {"source": s, "pairs": int(m.sum()), "rejection_rate": float(1 - keep[m].mean()),
               "paper_rejection": PAPER_REJECTION.get(s, ""), "test_labelled": int(lab.sum()),
               "test_related": int((y == 1).sum())}
        if 0 < (y == 1).sum() < len(y):
            row["test_auc"] = auc(y, score[lab])
            # how well the keep verdict separates the test labels: related kept vs unrelated kept
            row["kept_share_related"] = float(keep[lab][y == 1].mean())
            row["kept_share_unrelated"] = float(keep[lab][y == 0].mean())
        rows.append(row)
    return rows


def judge_ablation(judge_eval: pa.Table, test_events: pa.Table, min_rating: float | None,
                   embed_weight: float, tag_weight: float) -> list[dict]:
    """AUC on the test period's labels of the judge's evaluation pairs (``judge_eval``: pmi, cos,
    tag_cos per pair) for the LLM term alone, the embedding terms alone and the judge's mix."""
    from qarm_core.judge.calibrate import future_labels
    from qarm_core.rank.metrics import auc

    if judge_eval.num_rows == 0:
        return []
    t = judge_eval.group_by(["src_item", "dst_item"], use_threads=False).aggregate(
        [("pmi", "first"), ("cos", "first"), ("tag_cos", "first")])
    labels = future_labels(t, test_events, min_rating)
    m = labels >= 0
    y = labels[m]
    if not (0 < y.sum() < len(y)):
        return [{"term": "all", "labelled": int(m.sum()), "related": int(y.sum())}]
    pmi = t["pmi_first"].to_numpy(zero_copy_only=False).astype(np.float64)[m]
    cos = np.nan_to_num(t["cos_first"].to_numpy(zero_copy_only=False).astype(np.float64)[m])
    tcos = np.nan_to_num(t["tag_cos_first"].to_numpy(zero_copy_only=False).astype(np.float64)[m])
    emb = embed_weight * cos + tag_weight * tcos
    return [{"term": name, "labelled": int(m.sum()), "related": int(y.sum()), "test_auc": auc(y, s)}
            for name, s in (("LLM (PMI) alone", pmi), ("embedding terms alone", emb), ("mix (the judge)", pmi + emb))]


def quantizer_table(x: np.ndarray, levels: tuple[int, int], fsq_dims: int, fsq_levels: int,
                    seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    """Residual k-means (K1, K2, L**f) alone vs residual k-means (K1, K2) + FSQ (f digits of L
    levels) in both forms (PCA + quantile bins; the paper's learned sigmoid) at equal code space:
    raw collision, decode HR@1/HR@10 as mean and std over ``seeds``."""
    from qarm_core.quantize.quality import compare_rk_fsq

    space = (levels[0], levels[1], fsq_levels ** fsq_dims)
    runs = {form: [compare_rk_fsq(x, space, fsq_dims, fsq_levels, s, fsq_form=form) for s in seeds]
            for form in ("pca_quantile", "sigmoid")}
    rows = []
    for form, variant, label in (("pca_quantile", "rkmeans", "residual k-means x3"),
                                 ("pca_quantile", "rkmeans+fsq", "residual k-means x2 + FSQ (PCA, quantile bins)"),
                                 ("sigmoid", "rkmeans+fsq", "residual k-means x2 + FSQ (learned sigmoid, the paper's)")):
        row = {"variant": label, "code_space": levels[0] * levels[1] * fsq_levels ** fsq_dims, "seeds": len(seeds)}
        for metric in ("collision_rate", "decode_hr@1", "decode_hr@10"):
            v = np.array([r[variant][metric] for r in runs[form]])
            row[f"{metric}_mean"], row[f"{metric}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        rows.append(row)
    return rows


# ---------------------------------------------------------------- plots and the report
def _bar(ax, labels, values, errors=None, title=""):
    ax.bar(range(len(values)), values, yerr=errors, capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def plot_report(sections: dict, folder: str | Path) -> dict[str, Path]:
    """PNGs of the sections present: ranking AUC with CIs, recall@k per embedding, quantizer
    collision and decode HR. Returns name -> path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    if sections.get("ranking"):
        rows = sections["ranking"]
        diffs = [r for r in rows if r.get("vs_ref")]
        fig, axes = plt.subplots(1, 2 if diffs else 1, figsize=(12 if diffs else 7, 3.6), squeeze=False)
        ax = axes[0][0]
        vals = [r["auc_mean"] for r in rows]
        _bar(ax, [r["model"] for r in rows], vals, [r["auc_std"] for r in rows], "test AUC, mean ± std over seeds")
        ax.set_ylim(min(vals) - 0.02, max(vals) + 0.02)
        if diffs:
            # each model's test AUC minus the reference's (the best baseline on validation), with the
            # paired bootstrap's 95% CI: a bar whose interval crosses 0 is no measured difference
            ref = next((r["model"] for r in rows if not r.get("vs_ref")), "reference")
            d = np.array([r["vs_ref"]["diff"] for r in diffs])
            err = np.array([[r["vs_ref"]["diff"] - r["vs_ref"]["lo"] for r in diffs],
                            [r["vs_ref"]["hi"] - r["vs_ref"]["diff"] for r in diffs]])
            _bar(axes[0][1], [r["model"] for r in diffs], d, err, f"test AUC - {ref}'s, 95% paired bootstrap CI")
            axes[0][1].axhline(0.0, color="black", linewidth=0.8)
        fig.tight_layout()
        out["ranking"] = folder / "ranking_auc.png"
        fig.savefig(out["ranking"], dpi=90)
        plt.close(fig)
    if sections.get("embeddings"):
        rows = [r for r in sections["embeddings"] if r.get("pairs")]
        periods = sorted({r["period"] for r in rows})
        fig, axes = plt.subplots(1, max(len(periods), 1), figsize=(4 * max(len(periods), 1), 3.2), squeeze=False)
        for ax, p in zip(axes[0], periods):
            part = [r for r in rows if r["period"] == p]
            _bar(ax, [r["model"] for r in part], [r["recall_at_10"] for r in part], title=f"{p}: recall@10")
        fig.tight_layout()
        out["embeddings"] = folder / "embedding_recall.png"
        fig.savefig(out["embeddings"], dpi=90)
        plt.close(fig)
    if sections.get("quantizer"):
        rows = sections["quantizer"]
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        names = ["k-means x3", "+ FSQ (PCA)", "+ FSQ (sigmoid)"][:len(rows)]
        _bar(axes[0], names, [r["collision_rate_mean"] for r in rows], [r["collision_rate_std"] for r in rows],
             "raw collision rate")
        _bar(axes[1], names, [r["decode_hr@1_mean"] for r in rows], [r["decode_hr@1_std"] for r in rows], "decode HR@1")
        fig.tight_layout()
        out["quantizer"] = folder / "quantizer.png"
        fig.savefig(out["quantizer"], dpi=90)
        plt.close(fig)
    return out


def _md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _f(v, fmt=".4f"):
    return "" if v is None else format(v, fmt)


def render_report(sections: dict, meta: dict, plots: dict[str, Path] | None = None) -> str:
    """``report.md``: what was evaluated (snapshot, periods, machine, command) and one table per
    section, each with its plot."""
    plots = plots or {}
    out = [f"# qarm evaluate: snapshot {meta.get('snapshot_id', '?')}", "",
           f"Command: `{meta.get('command', 'qarm evaluate')}`  ", f"Machine: {meta.get('machine', '?')}  ",
           f"Periods: {meta.get('periods', '?')}", ""]
    if sections.get("embeddings"):
        out += ["## Embeddings: future co-occurrence (consecutive positives of a user, among training items)", "",
                _md_table(["period", "model", "pairs", "recall@10", "recall@50", "MRR"],
                          [[r["period"], r["model"], _pairs_cell(r), _f(r.get("recall_at_10")), _f(r.get("recall_at_50")),
                            _f(r.get("mrr"))] for r in sections["embeddings"]]), ""]
    if sections.get("judge"):
        out += ["## Judge: rejection rates and test-period AUC of the mined pairs", "",
                _md_table(["source", "pairs", "rejection rate (measured)", "QARM V2", "test labelled / related",
                           "test AUC of the score", "kept: related / unrelated"],
                          [[r["source"], r["pairs"], _f(r["rejection_rate"], ".3f"), r["paper_rejection"],
                            f"{r['test_labelled']} / {r['test_related']}", _f(r.get("test_auc")),
                            f"{_f(r.get('kept_share_related'), '.2f')} / {_f(r.get('kept_share_unrelated'), '.2f')}"]
                           for r in sections["judge"]]), ""]
    if sections.get("judge_ablation"):
        out += ["## Judge ablation: the score's terms on the evaluation pairs, labelled by the test period", "",
                _md_table(["term", "labelled", "related", "test AUC"],
                          [[r["term"], r["labelled"], r["related"], _f(r.get("test_auc"))]
                           for r in sections["judge_ablation"]]), ""]
    if sections.get("quantizer"):
        out += ["## Quantizer: equal code space, on the published embeddings", "",
                _md_table(["variant", "code space", "seeds", "raw collision", "decode HR@1", "decode HR@10"],
                          [[r["variant"], f"{r['code_space']:,}", r["seeds"],
                            f"{r['collision_rate_mean']:.4f} ± {r['collision_rate_std']:.4f}",
                            f"{r['decode_hr@1_mean']:.4f} ± {r['decode_hr@1_std']:.4f}",
                            f"{r['decode_hr@10_mean']:.4f} ± {r['decode_hr@10_std']:.4f}"]
                           for r in sections["quantizer"]]), ""]
    if sections.get("ranking"):
        from qarm_core.rank.compare import TABLE_HEADERS, format_table, history_table

        out += ["## Ranking: settings chosen on validation, test reported (mean ± std over seeds)", "",
                _md_table(TABLE_HEADERS, format_table(sections["ranking"])), ""]
        if any(r.get("by_history") for r in sections["ranking"]):
            out += ["### Test users with and without events before the test period", "",
                    _md_table(*history_table(sections["ranking"])), ""]
    if sections.get("ranking_pooled"):
        from qarm_core.rank.compare import POOL_HEADERS, history_table, pool_table

        p = sections["ranking_pooled"]
        out += [f"## Ranking, pooled: {p['comparisons']} comparisons on the same samples", "",
                "One paired bootstrap over the runs of every comparison and the test users, against "
                f"`{p['reference']}` ({p.get('reference_rule') or 'none chosen'}). Comparisons: "
                + "; ".join(f"`{src}`" for src in p["sources"]) + ".", ""]
        out += ([f"Not pooled: {p['error']}", ""] if p.get("error")
                else [_md_table(POOL_HEADERS, pool_table(p["rows"])), ""])
        if any(r.get("by_history") for r in p["rows"]):
            out += ["### Pooled: test users with and without events before the test period", "",
                    _md_table(*history_table(p["rows"])), ""]
    for name, p in plots.items():
        out += [f"![{name}]({Path(p).name})", ""]
    return "\n".join(out)
