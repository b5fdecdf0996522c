"""Benchmark: synthesise an interaction log to Parquet, then scan it with DuckDB.

Each phase runs in its own process so its peak RSS is its own. Prints one table of figures and
ratios measured in this run; the in-memory pyarrow scan is the reference the DuckDB scan is
compared against (same aggregates, whole table loaded).

    python benchmarks/bench_synth_scan.py [--interactions 10000000 --users 100000 --items 1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def phase_synth(out: str, users: int, items: int, interactions: int) -> dict:
    from qarm_core.schemas import INTERACTIONS
    from qarm_core.storage import write_parquet_dataset
    from qarm_core.synth import SynthSpec, iter_synthetic_interactions

    spec = SynthSpec(users=users, items=items, interactions=interactions, seed=0)
    t0 = time.perf_counter()
    rec = write_parquet_dataset(Path(out) / "interactions", iter_synthetic_interactions(spec), INTERACTIONS)
    secs = time.perf_counter() - t0
    size = sum((Path(rec.path) / f).stat().st_size for f in rec.files)
    return {"rows": rec.rows, "seconds": secs, "bytes": size}


AGG_SQL = """
SELECT count(*) AS n, count(DISTINCT user_id) AS users, count(DISTINCT item_id) AS items,
       avg(rating) AS mean_rating, min(ts) AS t0, max(ts) AS t1
FROM read_parquet('{glob}')
"""
TOP_SQL = "SELECT item_id, count(*) c FROM read_parquet('{glob}') GROUP BY item_id ORDER BY c DESC LIMIT 100"


def phase_duckdb(out: str, memory_limit: str) -> dict:
    from qarm_core.base import DuckDBConfig
    from qarm_core.duck import connect

    con = connect(DuckDBConfig(memory_limit=memory_limit, max_temp_directory_size="8GB", threads=2),
                  Path(out) / "duck_tmp")
    glob = str(Path(out) / "interactions" / "*.parquet")
    t0 = time.perf_counter()
    agg = con.sql(AGG_SQL.format(glob=glob)).fetchall()[0]
    top = con.sql(TOP_SQL.format(glob=glob)).fetchall()
    secs = time.perf_counter() - t0
    return {"seconds": secs, "rows": agg[0], "users": agg[1], "items": agg[2], "top_item_count": top[0][1]}


def phase_pyarrow(out: str) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    t = pq.read_table(Path(out) / "interactions")
    n, users, items = t.num_rows, pc.count_distinct(t["user_id"]).as_py(), pc.count_distinct(t["item_id"]).as_py()
    pc.mean(t["rating"]), pc.min_max(t["ts"])
    vc = pc.value_counts(t["item_id"])
    top = max(vc.field("counts").to_pylist())
    secs = time.perf_counter() - t0
    return {"seconds": secs, "rows": n, "users": users, "items": items, "top_item_count": top}


def run_phase(name: str, *args: str) -> dict:
    """Run one phase in a child process; returns its result plus its own peak RSS."""
    code = (f"import json, resource, sys; sys.path.insert(0, {str(REPO)!r}); "
            f"from benchmarks.bench_synth_scan import phase_{name}; "
            f"r = phase_{name}(*sys.argv[1:4]) if {name!r} != 'synth' else "
            f"phase_synth(sys.argv[1], *map(int, sys.argv[2:5])); "
            f"r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
            f"print(json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactions", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--memory-limit", default="2GB", help="DuckDB memory_limit for the scan")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp folder, removed)")
    args = ap.parse_args()
    import os as _os

    from qarm_core.devices import hardware_summary

    print(f"# {hardware_summary()}; load average {', '.join(f'{v:.2f}' for v in _os.getloadavg())}", flush=True)

    with tempfile.TemporaryDirectory(dir=args.workdir) as out:
        s = run_phase("synth", out, str(args.users), str(args.items), str(args.interactions))
        d = run_phase("duckdb", out, args.memory_limit)
        p = run_phase("pyarrow", out)
    if not (d["rows"] == p["rows"] == s["rows"] and d["users"] == p["users"] and d["items"] == p["items"]
            and d["top_item_count"] == p["top_item_count"]):
        raise SystemExit(f"scans disagree: duckdb={d} pyarrow={p}")

    n = s["rows"]
    print(f"\nsynth + scan, {n:,} interactions ({args.users:,} users, {args.items:,} items), "
          f"Parquet {s['bytes'] / 2**20:,.0f} MiB; DuckDB memory_limit {args.memory_limit}, 2 threads\n")
    print(f"| {'phase':<34} | {'seconds':>8} | {'M rows/s':>8} | {'peak RSS MiB':>12} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 14}|")
    for name, r in (("synth -> Parquet (streamed)", s), ("DuckDB scan: 2 aggregate queries", d),
                    ("pyarrow in-memory, same aggregates", p)):
        print(f"| {name:<34} | {r['seconds']:>8.2f} | {n / r['seconds'] / 1e6:>8.2f} | {r['peak_rss_mb']:>12,.0f} |")
    print(f"\nratios: DuckDB/pyarrow time {d['seconds'] / p['seconds']:.2f}x, "
          f"DuckDB/pyarrow peak RSS {d['peak_rss_mb'] / p['peak_rss_mb']:.2f}x; "
          f"synth peak RSS per million rows {s['peak_rss_mb'] / (n / 1e6):.1f} MiB")
    print(f"check: {d['users']:,} distinct users, {d['items']:,} distinct items, "
          f"top item {d['top_item_count']:,} events (both engines agree)")


if __name__ == "__main__":
    main()
