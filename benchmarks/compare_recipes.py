"""Two training recipes of the embedding model, compared on the same pairs: recall@10 of future
co-occurrence on the validation and test periods of one published ML-100K snapshot, each recipe's
seeds averaged per pair, and the difference A - B with a 95% paired bootstrap interval.

    python benchmarks/compare_recipes.py --home QARM_HOME --a DIR_A --step 1200
        (--b DIR_B [--step-b 800] | --baseline minilm|base [--work DIR])
        [--label-a full --label-b frozen] [--config configs/ml100k.yaml]

DIR_A and DIR_B are ``--save-vectors`` folders of ``benchmarks/embed_budget_ml100k.py`` (one per
recipe; every seed's ``lr*-seed*-step{step}.npz`` in a folder is one run of that recipe). B may be
the same recipe at another step (``--step-b``), or a baseline embedded here instead of a folder
(``--baseline``: MiniLM or the base LLM, embedded into ``--work``, by default under the home). The
steps are given, not chosen here: pick them before looking (the weekly budget) or on validation, and
read the test row as the result.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import machine, table  # noqa: E402

_NAME = re.compile(r"lr(?P<lr>[^-]+)-seed(?P<seed>\d+)-step(?P<step>\d+)\.npz")


def recipe_runs(folder: Path, step: int) -> dict[int, tuple]:
    """{seed: (item_ids ``(n,)``, vectors ``(n, dim)``)} of the runs saved in ``folder`` at ``step``.
    A folder with no run at that step, or runs of more than one learning rate there, is an error."""
    import numpy as np

    found = [(m, f) for f in sorted(folder.glob("*.npz")) if (m := _NAME.fullmatch(f.name))
             and int(m["step"]) == step]
    if not found:
        raise SystemExit(f"{folder}: no saved model at step {step} (lr*-seed*-step{step}.npz)")
    lrs = {m["lr"] for m, _ in found}
    if len(lrs) > 1:
        raise SystemExit(f"{folder}: runs of several learning rates at step {step} ({sorted(lrs)}); one recipe a folder")
    out = {}
    for m, f in found:
        with np.load(f) as z:
            out[int(m["seed"])] = (z["item_ids"], z["vectors"])
    return out


BASELINES = ("minilm", "base")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; B is a folder (``--b``, at ``--step-b``, by default ``--step``) or a
    baseline (``--baseline``), exactly one of them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True, help="QARM_HOME with the published ML-100K snapshot the runs trained on")
    ap.add_argument("--config", default=str(REPO / "configs" / "ml100k.yaml"))
    ap.add_argument("--a", type=Path, required=True, help="--save-vectors folder of recipe A")
    side_b = ap.add_mutually_exclusive_group(required=True)
    side_b.add_argument("--b", type=Path, help="--save-vectors folder of recipe B")
    side_b.add_argument("--baseline", choices=BASELINES, help="B is this baseline, embedded here")
    ap.add_argument("--label-a", default="A")
    ap.add_argument("--label-b", default=None, help="default: B, or the baseline's name")
    ap.add_argument("--step", type=int, required=True, help="the training step of A (and of B unless --step-b)")
    ap.add_argument("--step-b", type=int, default=None, help="the training step of B (a folder only)")
    ap.add_argument("--work", type=Path, default=None,
                    help="where a baseline is embedded (default: HOME/benchmarks/compare_recipes)")
    args = ap.parse_args(argv)
    if args.baseline and args.step_b is not None:
        ap.error("--step-b applies to a folder (--b), not to a baseline")
    if args.label_b is None:
        args.label_b = args.baseline or "B"
    if args.label_a == args.label_b:
        ap.error(f"--label-a and --label-b are both {args.label_a!r}: name the two sides apart")
    if args.step_b is None:
        args.step_b = args.step
    return args


def main(argv: list[str] | None = None) -> None:
    from benchmarks.embed_budget_ml100k import _baselines, _published_inputs, _scores, recall_difference_ci
    from qarm_core.config import load_config
    from qarm_core.devices import hardware_summary

    args = parse_args(argv)
    cfg = load_config(args.config, {"home": args.home})
    print(f"# {machine()}", flush=True)
    data = _published_inputs(cfg)
    runs = {args.label_a: recipe_runs(args.a, args.step)}
    if args.baseline:
        work = args.work or Path(args.home) / "benchmarks" / "compare_recipes"
        runs[args.label_b] = {0: _baselines(cfg, data, work, (args.baseline,))[args.baseline]}   # one model, no seeds
    else:
        runs[args.label_b] = recipe_runs(args.b, args.step_b)
    rows = []
    for label, by_seed in runs.items():
        for seed, model in sorted(by_seed.items()):
            sc = _scores({"m": model}, data, cfg.events.positive_min_rating)["m"]
            seed_cell = "-" if label == args.label_b and args.baseline else seed
            rows.append([label, seed_cell, f"{sc['valid']['recall_at_10']:.4f}", f"{sc['test']['recall_at_10']:.4f}"])
    diff = {p: recall_difference_ci(list(runs[args.label_a].values()), list(runs[args.label_b].values()), data,
                                    cfg.events.positive_min_rating, period=p) for p in ("valid", "test")}
    steps = f"{args.label_a} at step {args.step}; " + (f"{args.label_b} a baseline" if args.baseline
                                                        else f"{args.label_b} at step {args.step_b}")
    print(f"\nsnapshot {data['snapshot']}; {steps}; {hardware_summary()}")
    print(table(["recipe", "seed", "valid R@10", "test R@10"], rows))
    print(table(["period", f"{args.label_a} - {args.label_b} (seeds' mean models)", "95% paired bootstrap CI", "pairs"],
                [[p, f"{d['diff']:+.4f}", f"[{d['lo']:+.4f}, {d['hi']:+.4f}]", f"{d['pairs']:,}"]
                 for p, d in diff.items()]))


if __name__ == "__main__":
    main()
