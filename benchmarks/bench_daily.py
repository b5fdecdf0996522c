"""Benchmark: does the daily refresh's cost follow the day's change, not the catalog?

Day 0 is a synthetic catalog and log (default 1M items, 10M interactions, 100k users) refreshed
from scratch: mine, judge, QA, train, embed, quantize, publish. Day 1 adds 1% items and 10%
interactions (``qarm_core.synth.GrowthSpec``: same users and item popularity, new items drawn
more often than their share) and runs the daily deployment's mode: the published models are reused
(``embed.reuse_model``, ``mine.u2i.reuse_model``: the two towers mine untrained), the published judgments, evaluation scores, QA and embeddings are the
caches, the codebook is warm-started. Each day is one ``codebook-refresh`` flow run in its own
process; stage times are the MLflow stage runs' ``duration_s`` (gates counted with their stage).

The LLM stages run a tiny random llama (2 layers, width 32; ``lm.tiny.make_tiny_causal_lm``):
at 1M items SmolLM2-135M would take about a day on 2 CPU cores, so the measured times show the
pipeline's own cost, and the LLM work is counted in units (pairs scored, questions answered, items
encoded, training steps). A last phase measures SmolLM2's rate per unit on this machine (auto dtype)
and prints each day's LLM time projected from the units: that is the part of the ratio the tiny
model cannot show. The judge's rate is measured per day on a sample of that day's own LLM pairs
(whole source items), since a day whose new pairs share fewer contexts pays more per pair, and its
neutral passes (one per new item B) are counted and timed apart.

    python benchmarks/bench_daily.py [--items 1000000 --interactions 10000000 --users 100000]
                                     [--item-growth 0.01 --interaction-growth 0.10] [--days 2]
                                     [--out DIR] [--keep]

``--days 3`` adds a day 2, grown from day 1 as day 1 from day 0 and run on day 1's caches: whether
the daily cost stays where day 1 put it as the caches fill.

Every figure printed comes from this run; the CPU model and flags are printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import loadavg, run_phase, table  # noqa: E402

JUDGE_PROMPT = "pmi-generic-v1"          # synthetic products: the domain-neutral judge prompt
STAGES = ("ingest", "mine", "judge", "qa", "baselines", "train", "embed", "quantize", "publish")
# the units of LLM work each stage reports (MLflow metric of its stage run)
UNITS = {"judge": ("llm.pairs", "pairs scored"), "qa": ("questions", "questions answered"),
         "embed": ("encoded", "items encoded"), "train": ("steps", "training steps")}


# --------------------------------------------------------------------------------------------- data
def phase_data(out: str, users: int, items: int, interactions: int, item_growth: float,
               interaction_growth: float, seed: int, days: int = 2) -> dict:
    """Write days ``0 .. days - 1`` as Parquet folders: day 0 the base log, each later day the day
    before's files (hard links) plus that day's growth (``GrowthSpec.next_day``: new ids and events
    after the day before's)."""
    from qarm_core.schemas import INTERACTIONS, ITEMS
    from qarm_core.storage import write_parquet_dataset
    from qarm_core.synth import (GrowthSpec, SynthSpec, iter_growth_interactions, iter_growth_items,
                                 iter_synthetic_interactions, iter_synthetic_items)

    root = Path(out)
    spec = SynthSpec(users=users, items=items, interactions=interactions, seed=seed)
    g = GrowthSpec(spec, day=1, new_items=int(round(items * item_growth)),
                   new_interactions=int(round(interactions * interaction_growth)))
    t0 = time.perf_counter()
    for name, schema, base, grow in (("items", ITEMS, iter_synthetic_items, iter_growth_items),
                                     ("interactions", INTERACTIONS, iter_synthetic_interactions,
                                      iter_growth_interactions)):
        d0 = write_parquet_dataset(root / "day0" / name, base(spec), schema)
        files = {f: Path(d0.path) / f for f in d0.files}          # name in a day's folder -> file
        day = g
        for d in range(1, days):
            extra = write_parquet_dataset(root / f"growth{d}" / name, grow(day), schema)
            files |= {f"part-day{d}-{i:05d}.parquet": Path(extra.path) / f for i, f in enumerate(extra.files)}
            folder = root / f"day{d}" / name
            folder.mkdir(parents=True)
            for f, src in files.items():
                os.link(src, folder / f)
            day = day.next_day()
    return {"seconds": time.perf_counter() - t0, "new_items": g.new_items, "new_interactions": g.new_interactions}


def write_config(out: Path, day: int, tiny_lm: str, n_days: int) -> Path:
    """The benchmark's pipeline config for ``day`` of ``n_days`` (YAML under ``out``). Every day's
    snapshot is retained: the SmolLM2 phase reads each day's judgments after the last day ran."""
    import yaml

    lm = {"model_path": tiny_lm, "batch_size": 256}
    cfg = {
        "name": "bench-daily", "home": str(out / "home"), "storage": {"retention": n_days},
        "ingest": {"source": "files", "files": {"interactions": str(out / f"day{day}" / "interactions"),
                                                 "items": str(out / f"day{day}" / "items")}},
        "duckdb": {"memory_limit": "8GB", "max_temp_directory_size": "40GB", "threads": 2},
        "mine": {"sources": ["swing", "u2i"], "swing": {"top_k": 5, "keep_published_depth": 2},
                 "u2i": {"epochs": 1, "top_m": 2, "max_train_samples": 1_000_000, "reuse_model": day > 0}},
        "judge": {"local": lm, "prompt_version": JUDGE_PROMPT, "embed_weight": 0.0, "tag_weight": 0.0},
        "qa": {"local": lm, "k": 1, "batch_size": 256},
        "embed": {"model": {"model": tiny_lm}, "reuse_model": day > 0, "baselines": [],
                  "train": {"batch_size": 8, "max_steps": 40, "use_deepspeed": False, "holdout_fraction": 0.0},
                  "infer": {"batch_size": 256}},
        "quantize": {"levels": [256, 256], "fsq_dims": 4, "fsq_levels": 4},
        "gates": {"interactions": {"max_rows": 100_000_000, "rating_min": 1.0, "rating_max": 5.0},
                  "items": {"max_rows": 100_000_000}, "pairs": {"max_rows": 100_000_000},
                  "judgments": {"max_rows": 100_000_000}, "qa": {"max_rows": 100_000_000},
                  "embeddings": {"max_rows": 100_000_000}, "codes": {"max_rows": 100_000_000,
                                                                     "max_raw_collision_rate": 1.0, "max_resolved_collision_rate": 1.0}},
        "tracking": {"experiment": "bench-daily"},
    }
    path = out / f"day{day}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------- a day
def phase_refresh(config: str) -> dict:
    """One codebook-refresh flow run; per-stage seconds and LLM work units from its MLflow runs."""
    for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                 "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(k, v)
    from flows.codebook_refresh import codebook_refresh
    from qarm_core.config import load_config
    from tasks.tracking import runs_of

    t0 = time.perf_counter()
    summary = codebook_refresh(config_path=config)
    wall = time.perf_counter() - t0
    cfg = load_config(config).resolved()
    runs = [r for r in runs_of(cfg) if r["tags"].get("mlflow.parentRunId") == summary["mlflow_run_id"]]
    seconds = {s: 0.0 for s in STAGES}
    units: dict[str, float] = {}
    for r in runs:
        name = r["name"]
        stage = name.split("-")[1] if name.startswith("gate-") else name
        seconds[stage] = seconds.get(stage, 0.0) + r["metrics"].get("duration_s", 0.0)
        metric = UNITS.get(name, (None,))[0]
        if metric is not None:
            units[name] = r["metrics"].get(metric, 0.0)
        if name == "judge":
            units["judge.neutral"] = r["metrics"].get("neutral.computed", 0.0)
            units["judge.pairs.cached"] = r["metrics"].get("pairs.cached", 0.0)
            units["judge.pairs.cached.other_source"] = r["metrics"].get("pairs.cached.other_source", 0.0)
            units["judge.pairs"] = r["metrics"].get("pairs", 0.0)
        if name == "mine":
            for k in ("swing.pairs", "swing.new", "swing.new_if_fresh", "swing.kept_published", "swing.dropped", "u2i.pairs",
                      "u2i.reused", "u2i.train_seconds", "u2i.items_unseen", "swing.seconds", "u2i.seconds"):
                if k in r["metrics"]:
                    units[f"mine.{k}"] = r["metrics"][k]
        if name == "embed":
            units["embed.carried_over"] = r["metrics"].get("carried_over", 0.0)
        if name == "qa":        # qa.when_model_reused: defer (a day that reuses the published model)
            units["qa.deferred"] = r["metrics"].get("questions.deferred", 0.0)
        if name == "train" and r["metrics"].get("reused_published"):
            units["train"] = 0.0
    return {"wall_seconds_in_process": wall, "stage_seconds": seconds, "units": units, "rows": summary["rows"],
            "snapshot_path": str(summary["snapshot_path"])}


# --------------------------------------------------------------------------------------------- SmolLM2 rates
def day_llm_pairs(snapshots: list[str]) -> list[pa.Table]:
    """Each day's distinct pairs ``(n, src_item, dst_item)`` that the judge ran through the LLM:
    day 0's whole judgments (a fresh home), then each later day's judgments whose (src, dst, item
    text hash) the day before had not judged (the rest came from its cache). A pair mined by both
    sources is judged under each but scored once, so it counts once. ``snapshots``: the published
    snapshot folders, one per day, in order."""
    import pyarrow.dataset as ds

    cols = ["src_item", "dst_item", "text_hash"]
    days = [ds.dataset(Path(s) / "judgments").to_table(columns=cols) for s in snapshots]
    new = [days[0]] + [today.join(before.group_by(cols, use_threads=False).aggregate([]), keys=cols,
                                  join_type="left anti", use_threads=False)
                       for before, today in zip(days, days[1:])]
    return [t.group_by(cols[:2], use_threads=False).aggregate([]).sort_by([(c, "ascending") for c in cols[:2]])
            for t in new]


def sample_by_source(pairs: pa.Table, target: int, seed: int = 0) -> pa.Table:
    """Whole source items' pairs, source items in a seeded random order, until ``target`` pairs:
    a sample that keeps the day's pairs per shared context (the judge runs one context per source
    item), which a sample of single pairs would not."""
    import numpy as np
    import pyarrow as pa

    src = pairs["src_item"].to_numpy()
    order = np.argsort(src, kind="stable")
    firsts = np.flatnonzero(np.r_[True, src[order][1:] != src[order][:-1]])
    groups = np.split(order, firsts[1:])
    pick: list[int] = []
    for g in np.random.default_rng(seed).permutation(len(groups)):
        pick.extend(groups[g].tolist())
        if len(pick) >= target:
            break
    return pairs.take(pa.array(pick, pa.int64()))


def phase_smollm2_rates(items_dir: str, snapshots: list[str], pairs: int = 960, neutral_items: int = 200,
                        questions: int = 48, embed_items: int = 384, train_steps: int = 4,
                        dtype: str = "auto") -> dict:
    """Seconds per unit of LLM work with the default model (SmolLM2-135M) on this machine, in
    ``dtype`` (``auto``: chosen from the hardware; ``float32`` on a CPU with native bf16 stands in
    for one without it).

    The judge's rate is measured per day on that day's own LLM pairs (``day_llm_pairs``, sampled
    by ``sample_by_source``), because what a pair costs depends on how many pairs share its
    context: the conditional pass is timed with every item B's neutral pass known, and the neutral
    pass is timed on its own (the stage runs it once per new item B, counted as
    ``neutral.computed``).

    ``pairs``: the judge's sample a day. Which source items a sample holds moves the rate more than
    timing does: on session 24's week, one 240-pair sample timed twice differed by <= 3%, two 960-pair
    samples of other seeds by up to 6%, and the 240-pair rates moved the projected day ratios by up
    to 0.008 (README, "The judge's rate on larger samples"); 960 pairs cost ~30 s a day of SmolLM2."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as ds

    from qarm_core.devices import cpu_info
    from qarm_core.embed.config import EmbedConfig, EmbedModelConfig
    from qarm_core.embed.embed import LLMEmbedder
    from qarm_core.lm.local import LocalLM
    from qarm_core.lm.config import LocalModelConfig
    from qarm_core.judge.config import QAConfig
    from qarm_core.judge.judge import PairScorer, pair_components, render_items
    from qarm_core.judge.prompts import judge_prompt
    from qarm_core.judge.qa import generate_qa

    catalog = ds.dataset(items_dir).to_table()
    items = catalog.slice(0, 5_000)
    ids = items["item_id"].to_numpy()
    lm = LocalLM(LocalModelConfig(dtype=dtype))
    lm_dtype = lm.dtype_choice.name
    prompt = judge_prompt(JUDGE_PROMPT)

    def conditional_seconds(p: pa.Table, model: LocalLM) -> float:
        scorer = PairScorer(model, prompt)
        texts = render_items(catalog, set(p["dst_item"].to_pylist()), prompt.scored_format)
        scorer.preload_neutral({scorer.continuation(t): 0.0 for t in texts.values()})
        t0 = time.perf_counter()
        pair_components(p, catalog, scorer)
        return time.perf_counter() - t0

    days = day_llm_pairs(snapshots)
    conditional_seconds(sample_by_source(days[0], 16, seed=1), lm)     # warm-up: first calls pay one-off costs
    judge_s, judge_sample = [], []
    for d, day_pairs in enumerate(days):
        p = sample_by_source(day_pairs, pairs, seed=d)
        # a day without new pairs has no rate to measure (and no pairs to project)
        judge_s.append(conditional_seconds(p, lm) / p.num_rows if p.num_rows else 0.0)
        judge_sample.append({"pairs": p.num_rows, "sources": len(set(p["src_item"].to_pylist())),
                             "day_pairs": day_pairs.num_rows,
                             "day_sources": len(set(day_pairs["src_item"].to_pylist()))})
    scorer = PairScorer(lm, prompt)
    texts = render_items(catalog, set(ids[:neutral_items].tolist()), prompt.scored_format)
    conts = [scorer.continuation(t) for t in texts.values()]
    t0 = time.perf_counter()
    lm.continuation_logprobs([prompt.neutral] * len(conts), conts, prefix=prompt.prefix)
    neutral_s = (time.perf_counter() - t0) / len(conts)
    t0 = time.perf_counter()
    generate_qa(items, lm, QAConfig(k=1, batch_size=32), item_ids=ids[:questions].tolist())
    qa_s = (time.perf_counter() - t0) / questions
    emb = LLMEmbedder(items, EmbedModelConfig(), EmbedConfig(dtype=dtype))
    t0 = time.perf_counter()
    emb.embed_ids(ids[:embed_items].tolist())
    embed_s = (time.perf_counter() - t0) / embed_items
    del emb, lm
    # training: the benchmark config's step (8 pairs, DeepSpeed ZeRO-2), timed from step 2 on
    from qarm_core.embed.config import TrainConfig
    from qarm_core.embed.train import train_embedding_model

    rng = np.random.default_rng(0)          # pairs of the catalog's first items (the step's cost, not its data)
    judged = pa.table({"src_item": pa.array(rng.choice(ids, 192)), "dst_item": pa.array(rng.choice(ids, 192)),
                       "keep": pa.array([True] * 192)})
    seen: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        train_embedding_model(items, judged, None, d, EmbedModelConfig(),
                              TrainConfig(batch_size=8, max_steps=train_steps, checkpoint_every=10**6, dtype=dtype),
                              progress=seen.append)
    train_s = (seen[-1]["seconds"] - seen[0]["seconds"]) / (len(seen) - 1)
    return {"judge": judge_s, "judge_sample": judge_sample, "neutral": neutral_s, "qa": qa_s, "embed": embed_s,
            "train": train_s, "dtype": lm_dtype, "cpu": cpu_info().summary()}


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--interactions", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--item-growth", type=float, default=0.01)
    ap.add_argument("--interaction-growth", type=float, default=0.10)
    ap.add_argument("--days", type=int, default=2,
                    help="days to run, day 0 included (3: a day 2 grown from day 1 as day 1 from day 0, "
                         "run on day 1's caches)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="work folder (default: a temp folder, removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--llm-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="SmolLM2's numeric type for the projected LLM time (float32 on a bf16 CPU: the "
                         "stand-in for a CPU without native bf16)")
    args = ap.parse_args(argv)
    if args.days < 2:
        ap.error("--days: at least 2 (day 0 and a daily run)")

    from qarm_core.devices import hardware_summary
    from qarm_core.lm.tiny import make_tiny_causal_lm

    out = Path(args.out or tempfile.mkdtemp(prefix="qarm-bench-daily-"))
    out.mkdir(parents=True, exist_ok=True)
    days = range(args.days)
    print(f"# bench_daily: {args.items:,} items, {args.interactions:,} interactions, {args.users:,} users; "
          f"each later day +{args.item_growth:.0%} items, +{args.interaction_growth:.0%} interactions; "
          f"days 0-{args.days - 1}")
    print(f"# {hardware_summary()}; {loadavg()}", flush=True)
    res: dict = {"args": vars(args), "hardware": hardware_summary()}
    try:
        res["data"] = run_phase("benchmarks.bench_daily:phase_data", out=str(out), users=args.users,
                                items=args.items, interactions=args.interactions, item_growth=args.item_growth,
                                interaction_growth=args.interaction_growth, seed=args.seed, days=args.days)
        tiny = str(make_tiny_causal_lm(out / "tiny_lm"))
        for day in days:
            res[f"day{day}"] = run_phase("benchmarks.bench_daily:phase_refresh",
                                         config=str(write_config(out, day, tiny, args.days)))
            print(f"# day {day}: {res[f'day{day}']['wall_seconds']:.0f} s wall; {loadavg()}", flush=True)
        res["smollm2"] = run_phase("benchmarks.bench_daily:phase_smollm2_rates",
                                   items_dir=str(out / f"day{args.days - 1}" / "items"),
                                   snapshots=[res[f"day{d}"]["snapshot_path"] for d in days],
                                   dtype=args.llm_dtype)
    except BaseException:
        if args.json:           # what was measured before the failure is kept
            Path(args.json).write_text(json.dumps(res | {"failed": True}, indent=2, default=str))
        raise
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    report(res, args.days)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return res


def report(res: dict, n_days: int) -> None:
    """Print the measured and projected tables of a run's results (``main``'s ``res``)."""
    days = list(range(n_days))
    runs = [res[f"day{d}"] for d in days]
    later = days[1:]
    head = ["stage", *(f"day {d}" for d in days), *(f"day {d} / day 0" for d in later)]

    def ratio(a: float, b: float) -> str:
        return f"{b / a:.2f}" if a > 0 else "-"

    rows = []
    for s in STAGES:
        v = [r["stage_seconds"].get(s, 0.0) for r in runs]
        rows.append([s, *(f"{x:.1f}" for x in v), *(ratio(v[0], v[d]) for d in later)])
    tot = [sum(r["stage_seconds"].values()) for r in runs]
    rows.append(["all stages", *(f"{x:.1f}" for x in tot), *(ratio(tot[0], tot[d]) for d in later)])
    wall = [r["wall_seconds"] for r in runs]
    rows.append(["flow run, wall (process start included)", *(f"{x:.1f}" for x in wall),
                 *(ratio(wall[0], wall[d]) for d in later)])
    print("\nMeasured, LLM stages on the tiny random llama (seconds):\n")
    print(table(head, rows))

    rates = res["smollm2"]
    # (label, units per day, s/unit per day); the judge's pairs at each day's own rate
    work = [("judge: pairs scored (context + continuation)", [r["units"].get("judge", 0.0) for r in runs],
             rates["judge"]),
            ("judge: neutral passes (new items B)", [r["units"].get("judge.neutral", 0.0) for r in runs],
             [rates["neutral"]] * n_days)]
    work += [(f"{stage}: {label}", [r["units"].get(stage, 0.0) for r in runs], [rates[stage]] * n_days)
             for stage, (_, label) in UNITS.items() if stage != "judge"]
    urows, proj = [], [0.0] * n_days
    for label, units, per in work:
        for d in days:
            proj[d] += units[d] * per[d]
        per_s = f"{per[0]:.3f}" if len(set(per)) == 1 else " / ".join(f"{x:.3f}" for x in per)
        urows.append([label, *(f"{u:,.0f}" for u in units),
                      *(f"{units[d] / units[0]:.3f}" if units[0] else "-" for d in later), per_s,
                      *(f"{units[d] * per[d] / 3600:.2f}" for d in days)])
    # deferred QA (qa.when_model_reused: defer): asked by the next run that trains, not on the day
    deferred, qa0 = [r["units"].get("qa.deferred", 0.0) for r in runs], runs[0]["units"].get("qa", 0.0)
    urows.append(["qa: questions deferred to the next run that trains (not in the day's time)",
                  *(f"{u:,.0f}" for u in deferred), *(f"{deferred[d] / qa0:.3f}" if qa0 else "-" for d in later),
                  f"{rates['qa']:.3f}", *(f"({deferred[d] * rates['qa'] / 3600:.2f})" for d in days)])
    print(f"\nLLM work per day and its time projected with SmolLM2-135M ({rates['dtype']}) at the rates "
          f"measured here (the judge's per day, on a sample of that day's own LLM pairs):\n")
    print(table(["work", *(f"day {d}" for d in days), *(f"day {d} / day 0" for d in later), "SmolLM2 s/unit",
                 *(f"day {d} h" for d in days)], urows))
    print("judge rate samples (whole source items): " + "; ".join(
        f"day {d}: {x['pairs']} pairs of {x['sources']} source items (the day's LLM pairs: {x['day_pairs']:,} of "
        f"{x['day_sources']:,}, {x['day_pairs'] / max(x['day_sources'], 1):.2f} per source item)"
        for d, x in enumerate(rates["judge_sample"])))
    for d in later:
        u = runs[d]["units"]
        print(f"\nday {d}: judge pairs cached {u.get('judge.pairs.cached', 0):,.0f} of {u.get('judge.pairs', 0):,.0f} "
              f"({u.get('judge.pairs.cached.other_source', 0):,.0f} of them judged the day before under the other "
              f"source only); embeddings carried over: {u.get('embed.carried_over', 0):,.0f}")
        if "mine.swing.new" in u:
            print(f"day {d} pairs: Swing {u['mine.swing.pairs']:,.0f} ({u['mine.swing.new']:,.0f} not published the day "
                  f"before; {u['mine.swing.new_if_fresh']:,.0f} without mine.swing.keep_published_depth, "
                  f"{u['mine.swing.kept_published']:,.0f} published pairs kept outside today's top_k, "
                  f"{u.get('mine.swing.dropped', float('nan')):,.0f} published pairs dropped), "
                  f"u2i {u.get('mine.u2i.pairs', 0):,.0f}")
    for d in days:
        u = runs[d]["units"]
        if "mine.u2i.seconds" in u:
            print(f"day {d} mining: Swing {u.get('mine.swing.seconds', 0):.1f} s, two-tower {u['mine.u2i.seconds']:.1f} s "
                  + (f"(the published towers reused, {u.get('mine.u2i.items_unseen', 0):,.0f} items they never saw)"
                     if u.get("mine.u2i.reused") else f"(trained: {u.get('mine.u2i.train_seconds', 0):.1f} s)"))
    llm_measured = [sum(runs[d]["stage_seconds"].get(s, 0.0) for s in UNITS) for d in days]   # tiny LM included
    hours = [(tot[d] - llm_measured[d] + proj[d]) / 3600 for d in days]
    print("projected end to end (non-LLM stages as measured + projected LLM time): "
          + ", ".join(f"day {d} {h:.2f} h" for d, h in enumerate(hours)) + "; "
          + ", ".join(f"day {d} / day 0 = {hours[d] / hours[0]:.3f}" for d in later))
    # The LLM stages count as their SmolLM2 time alone; their own work beside the LLM (keying, I/O,
    # carrying embeddings over) is in their measured time, with the tiny LM's: adding all of it bounds
    # what the projection leaves out.
    upper = [h + llm_measured[d] / 3600 for d, h in enumerate(hours)]
    print("upper bound, the LLM stages' measured time (tiny LM included) added: "
          + ", ".join(f"day {d} / day 0 = {upper[d] / upper[0]:.3f}" for d in later))
    if any(deferred):
        # day 1's count is what qa.when_model_reused: generate answers that day; a later day's count
        # also holds the earlier days' deferred items still in kept pairs: more than generate would ask then
        print("with the questions deferred so far answered on the day (day 1: what qa.when_model_reused: "
              "generate asks; later days: more than it asks, their count also holds earlier days' items): "
              + ", ".join(f"day {d} / day 0 = {(hours[d] + deferred[d] * rates['qa'] / 3600) / hours[0]:.3f}"
                          for d in later))
    print(f"# {rates['cpu']}; {loadavg()}")


if __name__ == "__main__":
    main()
