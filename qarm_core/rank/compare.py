"""Train every model on the same data, budget, seeds and tuning procedure; a comparison table with
confidence intervals, and per-epoch curves.

Protocol (the same for every model):

1. For each learning rate of ``rank.train.lr_grid`` and each seed ``i`` of ``rank.train.seeds``, train
   on the training period's samples with negative set ``i`` for at most ``epochs`` epochs, keeping the
   epoch with the best validation AUC (``train_model``).
2. The model's learning rate is the one with the best mean validation AUC over the seeds.
3. Only those runs are scored on the test period: AUC, GAUC, logloss as mean and sample standard
   deviation (ddof=1) over the seeds, which vary initialisation, shuffling and the negatives.
4. The reference is the best baseline by mean validation AUC (chosen without looking at test); every
   other model's test AUC difference to it gets a 95% confidence interval from a paired bootstrap over
   test users (``paired_bootstrap``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qarm_core.arrays import count_distinct, union
from qarm_core.rank.config import RankConfig
from qarm_core.rank.data import RankData
from qarm_core.rank.models import resolve_spec
from qarm_core.rank.train import RunResult, score_on_test, train_model

METRICS = ("auc", "gauc", "logloss")


@dataclass
class ModelResult:
    name: str
    lr: float                                       # chosen on validation
    valid_auc_by_lr: dict[float, float]             # mean validation AUC over the seeds, per learning rate
    runs: list[RunResult]                           # the chosen learning rate's runs, one per seed, test-scored
    baseline: bool = True


@dataclass
class Comparison:
    table: list[dict]                                   # one row per model (see ``summarize``)
    curves: dict[str, list[list[dict]]]                 # model -> per seed -> per epoch (chosen lr)
    results: list[ModelResult] = field(default_factory=list)
    reference: str | None = None                        # the best baseline on validation


def tune_and_test(name: str, data: RankData, cfg: RankConfig,
                  on_epoch: Callable[[float, int, dict], None] | None = None) -> ModelResult:
    """Steps 1-3 of the protocol for one model; ``on_epoch(lr, seed, point)`` per epoch."""
    seeds = cfg.train.seeds
    best: tuple[float, list[RunResult]] | None = None
    by_lr: dict[float, float] = {}
    for lr in cfg.train.lr_grid:
        runs = [train_model(name, data, cfg, seed, i, lr=lr, evaluate_test=False,
                            on_epoch=(lambda p, lr=lr, s=seed: on_epoch(lr, s, p)) if on_epoch else None)
                for i, seed in enumerate(seeds)]
        by_lr[lr] = float(np.mean([r.valid_metrics["auc"] for r in runs]))
        if best is None or by_lr[lr] > by_lr[best[0]]:
            best = (lr, runs)
    lr, runs = best
    for i, r in enumerate(runs):
        score_on_test(r, data, i, cfg.train.eval_batch_size)
    return ModelResult(name, lr, by_lr, runs, resolve_spec(name).baseline)


def weighted_auc_groups(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows' tie-group index in ascending score order ``(n,)`` and the number of groups."""
    uniq, inv = np.unique(scores, return_inverse=True)
    return inv, len(uniq)


def weighted_auc(group: np.ndarray, n_groups: int, labels: np.ndarray, w: np.ndarray) -> float:
    """AUC with row weights ``w`` (ties count 1/2), given each row's tie group in score order."""
    wp = np.bincount(group, w * labels, n_groups)
    wn = np.bincount(group, w * (1 - labels), n_groups)
    below = np.cumsum(wn) - wn
    den = wp.sum() * wn.sum()
    return float((wp * (below + 0.5 * wn)).sum() / den) if den > 0 else float("nan")


def seed_test_auc(run: RunResult, data: RankData, subset: np.ndarray | None = None) -> float:
    """Test AUC of one seed's run on the test rows ``subset`` (a boolean mask over the rows of
    ``data``) marks; all its test rows without it."""
    keep = np.ones(len(run.test_rows), bool) if subset is None else subset[run.test_rows]
    g, n = weighted_auc_groups(run.test_logits[keep])
    y = data.label[run.test_rows[keep]].astype(np.float64)
    return weighted_auc(g, n, y, np.ones_like(y))


def paired_bootstrap(data: RankData, runs_a: list[RunResult], runs_b: list[RunResult], n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95, subset: np.ndarray | None = None,
                     resample_runs: bool = False) -> dict[str, float]:
    """The test AUC difference ``a - b`` averaged over seeds, and its bootstrap confidence interval.

    Paired: seed ``i`` of both models scored the same test rows (same negatives). Each replicate
    resamples test users with replacement (a user's samples move together, as GAUC groups them), ONE
    draw of users for all seeds (the seeds score the same test users: resampling them independently
    per seed would treat them as independent samples and shrink the interval as seeds are added), and
    recomputes both AUCs of every seed on it. The interval is then over test users, for these seeds'
    models; with ``resample_runs`` each replicate also draws the (a, b) pairs of runs with replacement
    (a two-level bootstrap), so that the variation between runs (seeds, pipeline seeds) widens it too.
    ``subset``: a boolean mask over the rows of ``data`` (``history_groups``); only the test rows it
    marks count. Returns ``diff``, ``lo``, ``hi``, ``p_le_0`` (the share of replicates with a difference <= 0).
    """
    if len(runs_a) != len(runs_b):
        raise ValueError("paired bootstrap needs the same seeds for both models")
    rng = np.random.default_rng(seed)
    per_seed = []
    for ra, rb in zip(runs_a, runs_b):
        if not np.array_equal(ra.test_rows, rb.test_rows):
            raise ValueError(f"seed {ra.seed}: the two models were scored on different test rows")
        keep = np.ones(len(ra.test_rows), bool) if subset is None else subset[ra.test_rows]
        rows = ra.test_rows[keep]
        y = data.label[rows].astype(np.float64)
        ga, na = weighted_auc_groups(ra.test_logits[keep])
        gb, nb = weighted_auc_groups(rb.test_logits[keep])
        per_seed.append((data.user_id[rows], y, ga, na, gb, nb))
    users = union(*[p[0] for p in per_seed]) if per_seed else np.zeros(0, np.int64)
    per_seed = [(np.searchsorted(users, u), *rest) for u, *rest in per_seed]       # rows -> position in users
    point = float(np.mean([weighted_auc(ga, na, y, np.ones_like(y)) - weighted_auc(gb, nb, y, np.ones_like(y))
                           for _, y, ga, na, gb, nb in per_seed]))
    diffs = np.empty(n_boot)
    for b in range(n_boot):
        counts = rng.multinomial(len(users), np.full(len(users), 1.0 / len(users))).astype(np.float64)
        picked = rng.integers(0, len(per_seed), len(per_seed)) if resample_runs else range(len(per_seed))
        diffs[b] = np.mean([weighted_auc(ga, na, y, counts[user_of_row]) - weighted_auc(gb, nb, y, counts[user_of_row])
                            for user_of_row, y, ga, na, gb, nb in (per_seed[i] for i in picked)])
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return {"diff": point, "lo": float(lo), "hi": float(hi), "p_le_0": float((diffs <= 0).mean())}


def summarize(result: ModelResult) -> dict:
    """One table row: model, kind, chosen lr, validation AUC per lr, seeds, best epochs,
    ``<metric>_mean``/``<metric>_std`` on test, per-seed test AUCs, training samples/s, parameters."""
    runs = result.runs
    row: dict = {"model": result.name, "kind": "baseline" if result.baseline else "ours", "lr": result.lr,
                 "valid_auc_by_lr": {str(k): round(v, 5) for k, v in result.valid_auc_by_lr.items()},
                 "valid_auc_mean": result.valid_auc_by_lr[result.lr], "seeds": len(runs),
                 "best_epochs": [r.best_epoch for r in runs]}
    for m in METRICS:
        v = np.array([r.metrics[m] for r in runs], dtype=np.float64)
        row[f"{m}_mean"] = float(v.mean())
        row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    row["auc_per_seed"] = [round(r.metrics["auc"], 5) for r in runs]
    row["train_samples_per_s"] = float(np.mean([r.train_samples_per_s for r in runs]))
    row["n_params"] = runs[0].n_params
    return row


HISTORY_GROUPS = ("with_history", "without_history")


def history_groups(data: RankData) -> dict[str, np.ndarray]:
    """Boolean masks over the rows of ``data``, by whether the row's user has any event before the
    test period (the smallest ``pos`` of the user's real test-period events is the number of events
    before that period): ``with_history`` (a long-sequence model has a past to search) and
    ``without_history`` (under the global time split such a user's history holds test-period events
    only). Rows of users with no test-period event fall in neither."""
    real = (data.split == "test") & (data.neg_set < 0)
    users, pos = data.user_id[real], data.pos[real]
    if not len(users):
        none = np.zeros(len(data.user_id), bool)
        return {g: none for g in HISTORY_GROUPS}
    order = np.lexsort((pos, users))
    uniq, first = np.unique(users[order], return_index=True)
    before = pos[order][first]                                    # (n_test_users,) events before the test period
    return {"with_history": np.isin(data.user_id, uniq[before > 0]),
            "without_history": np.isin(data.user_id, uniq[before == 0])}


def add_differences(data: RankData, results: list[ModelResult], table: list[dict], n_boot: int = 1000
                    ) -> str | None:
    """Step 4: fill ``vs_ref`` (diff, lo, hi in AUC) of every row against the best baseline on
    validation, and ``by_history`` (per ``history_groups`` group: users, samples, test AUC mean/std
    over the seeds, ``vs_ref`` on that group's users alone); returns the reference's name (None
    without a baseline)."""
    baselines = [r for r in results if r.baseline]
    if not baselines:
        return None
    ref = max(baselines, key=lambda r: r.valid_auc_by_lr[r.lr])
    groups = history_groups(data)
    for res, row in zip(results, table):
        row["vs_ref"] = None if res is ref else paired_bootstrap(data, res.runs, ref.runs, n_boot=n_boot)
        row["reference"] = ref.name
        row["by_history"] = by_group(data, groups, res.runs, None if res is ref else ref.runs, n_boot)
    return ref.name


def by_group(data: "RankData | ComparisonScores", groups: dict[str, np.ndarray], runs: list[RunResult],
             ref_runs: list[RunResult] | None, n_boot: int = 1000, **boot) -> dict[str, dict]:
    """Per group of ``groups`` (boolean masks over the rows, ``history_groups``): the users and
    samples of the first run's test rows in it, the runs' test AUC mean/std there, and ``vs_ref``, the
    paired bootstrap against ``ref_runs`` on that group's users alone (None for the reference itself;
    ``boot``: more ``paired_bootstrap`` options). A group whose rows lack a class has no AUC and is
    left out."""
    out = {}
    for name, mask in groups.items():
        rows = runs[0].test_rows[mask[runs[0].test_rows]]
        y = data.label[rows]
        if not (y > 0).any() or not (y == 0).any():
            continue
        aucs = np.array([seed_test_auc(r, data, mask) for r in runs])
        out[name] = {"users": count_distinct(data.user_id[rows]), "samples": int(len(rows)),
                     "auc_mean": float(aucs.mean()), "auc_std": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0,
                     "vs_ref": None if ref_runs is None else paired_bootstrap(data, runs, ref_runs, n_boot=n_boot,
                                                                              subset=mask, **boot)}
    return out


@dataclass
class ComparisonScores:
    """What one comparison scored on test, enough to pool comparisons later (``pool_comparisons``):
    ``user_id`` and ``label`` ``(n_rows,)`` indexed by the sample rows of the comparison's RankData
    (-1 / 0 where no test row), each model's chosen runs (their ``test_rows`` and ``test_logits``)
    and the comparison's reference; ``groups``: ``history_groups``' masks over the same rows;
    ``valid_auc`` and ``baselines``, what chose the reference (the last three are empty in files of
    comparisons before 2026-12-05)."""
    user_id: np.ndarray
    label: np.ndarray
    runs: dict[str, list[RunResult]]
    reference: str | None
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    valid_auc: dict[str, float] = field(default_factory=dict)   # model -> mean validation AUC at its lr
    baselines: tuple[str, ...] = ()


def comparison_score_arrays(data: RankData, results: list[ModelResult], reference: str | None) -> dict[str, np.ndarray]:
    """``results``' test scores as named arrays (``np.savez``; ``load_comparison_scores`` reads them back):
    the test rows' users, labels and ``history_groups``, and per model its learning rate, validation
    AUC there, whether it is a baseline, and each seed's test rows and logits."""
    rows = union(*[r.test_rows for res in results for r in res.runs])
    groups = history_groups(data)
    out = {"rows": rows, "user_id": data.user_id[rows].astype(np.int64), "label": data.label[rows].astype(np.float32),
           "models": np.array([res.name for res in results]), "reference": np.array([reference or ""]),
           "groups": np.array(list(groups))} | {f"group.{g}": m[rows] for g, m in groups.items()}
    for res in results:
        out[f"{res.name}.lr"] = np.array([res.lr])
        out[f"{res.name}.valid_auc"] = np.array([res.valid_auc_by_lr[res.lr]])
        out[f"{res.name}.baseline"] = np.array([res.baseline])
        out[f"{res.name}.seeds"] = np.array([r.seed for r in res.runs], np.int64)
        for r in res.runs:
            out[f"{res.name}.seed{r.seed}.rows"] = r.test_rows.astype(np.int64)
            out[f"{res.name}.seed{r.seed}.logits"] = r.test_logits.astype(np.float32)
    return out


def load_comparison_scores(arrays) -> ComparisonScores:
    """The inverse of ``comparison_score_arrays`` (a dict or an opened ``.npz``)."""
    rows = np.asarray(arrays["rows"])
    n = int(rows.max()) + 1 if len(rows) else 0
    user_id, label = np.full(n, -1, np.int64), np.zeros(n, np.float32)
    user_id[rows], label[rows] = arrays["user_id"], arrays["label"]
    names = [str(m) for m in arrays["models"]]
    runs = {}
    for name in names:
        lr = float(arrays[f"{name}.lr"][0])
        runs[name] = [RunResult(model=name, seed=int(s), metrics={}, lr=lr,
                                test_rows=np.asarray(arrays[f"{name}.seed{s}.rows"]),
                                test_logits=np.asarray(arrays[f"{name}.seed{s}.logits"]))
                      for s in arrays[f"{name}.seeds"]]
    ref = str(arrays["reference"][0]) or None
    groups = {}
    for g in (str(g) for g in (arrays["groups"] if "groups" in arrays else [])):
        groups[g] = np.zeros(n, bool)
        groups[g][rows] = arrays[f"group.{g}"]
    valid = {m: float(arrays[f"{m}.valid_auc"][0]) for m in names if f"{m}.valid_auc" in arrays}
    baselines = tuple(m for m in names if f"{m}.baseline" in arrays and bool(arrays[f"{m}.baseline"][0]))
    return ComparisonScores(user_id=user_id, label=label, runs=runs, reference=ref, groups=groups, valid_auc=valid,
                            baselines=baselines)


def read_comparison_scores(path: str | Path) -> ComparisonScores:
    """A comparison's ``test_scores.npz`` (the ``rank/`` artifact of every comparison). Raises
    ValueError, saying so, when ``path`` cannot be read or is not such a file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return load_comparison_scores(z)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"not a comparison's test scores: {exc}".replace("\n", " ")) from None


def other_samples(user_id: np.ndarray, label: np.ndarray, scores: ComparisonScores) -> bool:
    """Whether ``scores`` were measured on other ranking samples than the rows ``user_id``/``label``
    describe (a user id < 0: a row not known yet, which agrees with anything): some row they share
    differs in its user or label, or ``scores`` hold rows beyond them."""
    rows = np.flatnonzero(scores.user_id >= 0)
    if len(rows) and rows[-1] >= len(user_id):
        return True
    known = user_id[rows] >= 0
    return bool((user_id[rows][known] != scores.user_id[rows][known]).any()
                or (label[rows][known] != scores.label[rows][known]).any())


def pooled_reference(sets: list[ComparisonScores]) -> tuple[str, str]:
    """The reference of pooled comparisons and why: the baseline of every comparison with the best
    validation AUC averaged over them (the rule each comparison applies alone, over the pool: a
    baseline that reads the pipeline's embeddings may win on one snapshot's validation and not on
    another's); where a file records no validation AUCs (written before 2026-12-05), the reference
    the comparisons agree on. Raises ValueError when there is none (name one instead)."""
    common = [m for m in sets[0].runs if all(m in t.runs for t in sets)]
    if all(t.valid_auc for t in sets):
        cands = [m for m in common if all(m in t.baselines and m in t.valid_auc for t in sets)]
        if not cands:
            raise ValueError("no baseline is in every comparison: name the reference")
        mean = {m: float(np.mean([t.valid_auc[m] for t in sets])) for m in cands}
        best = max(cands, key=mean.get)
        return best, (f"the best baseline by validation AUC averaged over the {len(sets)} comparisons "
                      + ", ".join(f"{m} {mean[m]:.4f}" for m in cands))
    refs = {t.reference for t in sets}
    if len(refs) == 1 and None not in refs:
        return refs.pop(), "the best baseline on validation of every comparison"
    raise ValueError(f"the comparisons chose different references ({', '.join(sorted(map(str, refs)))}) and not "
                     "every file records the validation AUCs to choose between them: name the reference")


def pool_comparisons(sets: list[ComparisonScores], reference: str | None = None, n_boot: int = 1000,
                     seed: int = 0, resample_runs: bool = True) -> tuple[str, list[dict]]:
    """Pool comparisons run on the same ranking samples with other inputs (e.g. snapshots of several
    pipeline seeds): every model's runs of every comparison against the reference's runs of the same
    comparison and seed, in one paired bootstrap (``paired_bootstrap``: the difference averaged over
    all of them); with ``resample_runs`` (default) the runs are resampled too, so that the interval
    carries the variation between runs and pipeline seeds, not only over test users. ``reference``:
    ``pooled_reference``'s unless given; it and a model must be in every comparison to be pooled.
    Returns (reference, one row per pooled model: model, reference, runs, test AUC mean/std over the
    runs, ``vs_ref`` (None for the reference), ``per_set`` (the difference within each comparison) and
    ``by_history`` (``by_group`` over the groups a comparison recorded, with the same bootstrap)).
    Raises ValueError when the comparisons' test rows disagree on users or labels (other samples)."""
    if not sets:
        raise ValueError("nothing to pool")
    ref = reference or pooled_reference(sets)[0]
    if not ref or any(ref not in t.runs for t in sets):
        raise ValueError(f"reference {ref!r} is not in every comparison")
    n = max(len(t.user_id) for t in sets)
    user_id, label = np.full(n, -1, np.int64), np.zeros(n, np.float32)
    for i, t in enumerate(sets):
        if other_samples(user_id, label, t):
            raise ValueError(f"comparison {i + 1} scored other ranking samples than the ones before it (users or "
                             "labels of the same rows differ): only comparisons on the same samples pool")
        rows = np.flatnonzero(t.user_id >= 0)
        user_id[rows], label[rows] = t.user_id[rows], t.label[rows]
    # the groups of whichever comparison recorded them (the samples are the same; older files have none)
    groups = next((t.groups for t in sets if t.groups), {})
    groups = {g: np.pad(m, (0, n - len(m))) for g, m in groups.items()}
    pooled = ComparisonScores(user_id=user_id, label=label, runs={}, reference=ref, groups=groups)  # what scoring reads
    models = [m for m in sets[0].runs if all(m in t.runs for t in sets)]
    # (comparison, run) -> test AUC, per model: each run scored once
    aucs = {m: [[seed_test_auc(r, pooled) for r in t.runs[m]] for t in sets] for m in models}
    ref_runs = [r for t in sets for r in t.runs[ref]]
    out = []
    for m in models:
        runs = [r for t in sets for r in t.runs[m]]
        if len(runs) != len(ref_runs):
            raise ValueError(f"{m}: {len(runs)} runs against the reference's {len(ref_runs)} (other seeds)")
        flat = np.array([a for per in aucs[m] for a in per])
        row = {"model": m, "reference": ref, "runs": len(runs), "auc_mean": float(flat.mean()),
               "auc_std": float(flat.std(ddof=1)) if len(flat) > 1 else 0.0, "vs_ref": None, "per_set": None}
        if m != ref:
            row["vs_ref"] = paired_bootstrap(pooled, runs, ref_runs, n_boot=n_boot, seed=seed,
                                             resample_runs=resample_runs)
            row["per_set"] = [float(np.mean(np.subtract(a, b))) for a, b in zip(aucs[m], aucs[ref])]
        row["by_history"] = by_group(pooled, groups, runs, None if m == ref else ref_runs, n_boot, seed=seed,
                                     resample_runs=resample_runs)
        out.append(row)
    return ref, out


def compare(data: RankData, cfg: RankConfig, models: list[str] | None = None,
            on_model: Callable[[ModelResult, dict], None] | None = None,
            on_epoch: Callable[[str, float, int, dict], None] | None = None, n_boot: int = 1000) -> Comparison:
    """Run the protocol for each model; ``on_model(result, row)`` as each finishes (the flow logs it to
    MLflow there), ``on_epoch(model, lr, seed, point)`` per epoch."""
    results, table, curves = [], [], {}
    for name in models or cfg.models:
        cb = (lambda lr, s, p, n=name: on_epoch(n, lr, s, p)) if on_epoch else None
        res = tune_and_test(name, data, cfg, on_epoch=cb)
        row = summarize(res)
        results.append(res)
        table.append(row)
        curves[name] = [r.curves for r in res.runs]
        if on_model:
            on_model(res, row)
    ref = add_differences(data, results, table, n_boot)
    return Comparison(table, curves, results, ref)


def format_table(table: list[dict]) -> list[list[str]]:
    """Rows of strings (see ``TABLE_HEADERS``); AUC differences in points (x100) with their CI."""
    out = []
    for r in table:
        delta = _delta(r.get("vs_ref"), r.get("reference") == r["model"])
        out.append([r["model"], r["kind"], f"{r['lr']:g}", f"{r['valid_auc_mean']:.4f}",
                    f"{r['auc_mean']:.4f} ± {r['auc_std']:.4f}", f"{r['gauc_mean']:.4f} ± {r['gauc_std']:.4f}",
                    f"{r['logloss_mean']:.4f} ± {r['logloss_std']:.4f}", delta])
    return out


TABLE_HEADERS = ["model", "kind", "lr (valid)", "valid AUC", "test AUC", "test GAUC", "test logloss",
                 "ΔAUC vs best baseline, pts [95% CI]"]


def _delta(v: dict | None, is_ref: bool) -> str:
    if v is None:
        return "reference" if is_ref else ""
    return f"{100 * v['diff']:+.2f} [{100 * v['lo']:+.2f}, {100 * v['hi']:+.2f}]"


POOL_HEADERS = ["model", "runs", "test AUC", "ΔAUC vs reference, pts [95% CI]", "P(Δ <= 0)", "Δ per comparison, pts"]


def pool_table(rows: list[dict]) -> list[list[str]]:
    """Cells of ``pool_comparisons``' rows under ``POOL_HEADERS``."""
    return [[r["model"], str(r["runs"]), f"{r['auc_mean']:.4f} ± {r['auc_std']:.4f}",
             _delta(r["vs_ref"], r["vs_ref"] is None), "" if r["vs_ref"] is None else f"{r['vs_ref']['p_le_0']:.3f}",
             "" if r["per_set"] is None else " / ".join(f"{100 * d:+.2f}" for d in r["per_set"])] for r in rows]


def history_table(table: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of strings): each model's test AUC and difference to the reference on the users
    with events before the test period and on those without (``add_differences``' ``by_history``);
    the headers carry each group's users and samples (seed 0's negatives)."""
    first = next((r["by_history"] for r in table if r.get("by_history")), {})
    heads = ["model"]
    for g in HISTORY_GROUPS:
        label = g.replace("_", " ")
        n = first.get(g)
        size = f" ({n['users']} users, {n['samples']:,} samples)" if n else ""
        heads += [f"test AUC, {label}{size}", f"ΔAUC pts [95% CI], {label}"]
    rows = []
    for r in table:
        cells = [r["model"]]
        for g in HISTORY_GROUPS:
            v = (r.get("by_history") or {}).get(g)
            cells += (["n/a", ""] if v is None else
                      [f"{v['auc_mean']:.4f} ± {v['auc_std']:.4f}", _delta(v["vs_ref"], r.get("reference") == r["model"])])
        rows.append(cells)
    return heads, rows


def plot_curves(curves: dict[str, list[list[dict]]], path: str | Path,
                metrics: tuple[str, ...] = ("train_loss", "valid_auc", "valid_gauc", "valid_logloss")) -> Path:
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
