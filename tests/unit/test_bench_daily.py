"""bench_daily: its sampling of each day's LLM pairs (the judge's rate is measured on them), its chained
days of data and its report."""

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.bench_daily import day_llm_pairs, sample_by_source


def _snapshot(path, rows):
    (path / "judgments").mkdir(parents=True)
    src, dst, h = zip(*rows)
    pq.write_table(pa.table({"src_item": pa.array(src, pa.int64()), "dst_item": pa.array(dst, pa.int64()),
                             "source": ["swing"] * len(rows), "text_hash": list(h)}),
                   path / "judgments" / "part-0.parquet")
    return str(path)


def test_each_day_counts_its_new_distinct_pairs(tmp_path):
    day0 = _snapshot(tmp_path / "d0", [(1, 2, "a"), (1, 2, "a"), (1, 3, "b"), (4, 5, "c")])   # (1, 2) twice: two sources
    # day 1: (1, 2) unchanged, (1, 3) with a new text, (6, 7) new
    day1 = _snapshot(tmp_path / "d1", [(1, 2, "a"), (1, 3, "x"), (4, 5, "c"), (6, 7, "d")])
    d0, d1 = day_llm_pairs([day0, day1])
    assert d0.to_pylist() == [{"src_item": 1, "dst_item": 2}, {"src_item": 1, "dst_item": 3},
                              {"src_item": 4, "dst_item": 5}]
    assert d1.to_pylist() == [{"src_item": 1, "dst_item": 3}, {"src_item": 6, "dst_item": 7}]
    assert day_llm_pairs([day0, day0])[1].num_rows == 0


def test_the_sample_keeps_whole_source_items():
    src = [1, 1, 1, 2, 2, 3, 4, 4, 4, 4]
    pairs = pa.table({"src_item": pa.array(src, pa.int64()), "dst_item": pa.array(range(10), pa.int64())})
    for seed in range(5):
        s = sample_by_source(pairs, 4, seed=seed)
        got = s["src_item"].to_pylist()
        assert len(got) >= 4 and all(got.count(x) == src.count(x) for x in set(got))
        assert s.to_pylist() == sample_by_source(pairs, 4, seed=seed).to_pylist()      # seeded
    assert sample_by_source(pairs, 100).num_rows == 10
    assert sample_by_source(pairs.slice(0, 0), 4).num_rows == 0


def test_data_phase_chains_days_each_folder_holding_the_day_before(tmp_path):
    """--days 3: day 2's folder is day 1's files plus day 2's growth, whose new ids follow day 1's."""
    import pyarrow.dataset as ds

    from benchmarks.bench_daily import phase_data

    phase_data(str(tmp_path), users=30, items=100, interactions=1_000, item_growth=0.1,
               interaction_growth=0.2, seed=0, days=3)
    items = [ds.dataset(tmp_path / f"day{d}" / "items").to_table() for d in range(3)]
    events = [ds.dataset(tmp_path / f"day{d}" / "interactions").to_table() for d in range(3)]
    assert [t.num_rows for t in items] == [100, 110, 120]
    assert [t.num_rows for t in events] == [1_000, 1_200, 1_400]
    assert sorted(items[2]["item_id"].to_pylist()) == list(range(120))
    # each day holds the day before's rows unchanged
    for before, today in ((items[0], items[1]), (items[1], items[2]), (events[0], events[1]), (events[1], events[2])):
        key = "item_id" if "title" in before.column_names else "ts"
        assert set(before[key].to_pylist()) <= set(today[key].to_pylist())


def test_report_gives_every_later_day_against_day_0(capsys):
    from benchmarks.bench_daily import STAGES, report

    def day(seconds: float, pairs: float) -> dict:
        return {"stage_seconds": {s: seconds for s in STAGES}, "wall_seconds": seconds * len(STAGES),
                "units": {"judge": pairs, "judge.neutral": 0.0, "qa": 0.0, "embed": 0.0, "train": 0.0}}

    res = {"day0": day(10.0, 1_000), "day1": day(2.0, 100), "day2": day(1.0, 50),
           "smollm2": {"judge": [0.1, 0.2, 0.4], "neutral": 0.0, "qa": 0.0, "embed": 0.0, "train": 0.0,
                       "dtype": "float32", "cpu": "test CPU", "judge_sample": []}}
    report(res, 3)
    out = capsys.readouterr().out
    all_stages = next(line for line in out.splitlines() if line.startswith("| all stages"))
    assert [c.strip() for c in all_stages.strip("|").split("|")][1:] == ["90.0", "18.0", "9.0", "0.20", "0.10"]
    # projected: the non-LLM stages as measured + each day's LLM units at that day's rate:
    # day 0 = (90 - 4 LLM stages x 10) + 1,000 x 0.1 = 150; day 1 = 10 + 20 = 30; day 2 = 5 + 20 = 25
    assert "day 1 / day 0 = 0.200, day 2 / day 0 = 0.167" in out
    # the bound adds the 4 LLM stages' measured seconds back: day 0 190, day 1 38, day 2 29
    assert "(tiny LM included) added: day 1 / day 0 = 0.200, day 2 / day 0 = 0.153" in out


def test_report_leaves_deferred_qa_out_of_the_day_and_says_what_it_would_cost(capsys):
    """QA deferred by a daily run (``qa.when_model_reused: defer``) is asked by the next run that
    trains: its questions are listed, not counted in the day's projection, and the ratio with them
    answered on the day is printed beside it."""
    from benchmarks.bench_daily import STAGES, report

    def day(seconds: float, pairs: float, questions: float, deferred: float) -> dict:
        return {"stage_seconds": {s: seconds for s in STAGES}, "wall_seconds": seconds * len(STAGES),
                "units": {"judge": pairs, "judge.neutral": 0.0, "qa": questions, "qa.deferred": deferred,
                          "embed": 0.0, "train": 0.0}}

    res = {"day0": day(10.0, 1_000, 100, 0), "day1": day(2.0, 100, 0, 100),
           "smollm2": {"judge": [0.1, 0.2], "neutral": 0.0, "qa": 0.5, "embed": 0.0, "train": 0.0,
                       "dtype": "float32", "cpu": "test CPU", "judge_sample": []}}
    report(res, 2)
    out = capsys.readouterr().out
    # day 0 = (90 - 40) + 1,000 x 0.1 + 100 x 0.5 = 200; day 1 = 10 + 100 x 0.2 = 30; with the 100
    # deferred questions answered on the day: 30 + 50 = 80
    assert "day 1 / day 0 = 0.150" in out
    assert "answered on the day (day 1: what qa.when_model_reused: generate asks; later days: more than it " \
           "asks, their count also holds earlier days' items): day 1 / day 0 = 0.400" in out
    row = next(line for line in out.splitlines() if line.startswith("| qa: questions deferred"))
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["0", "100", "1.000", "0.500", "(0.00)", "(0.01)"]


def test_every_days_config_retains_every_days_snapshot(tmp_path):
    """The SmolLM2 phase reads each day's judgments after the last day: with more days than the
    default retention (5), day 0's snapshot must still be there (a 7-day run lost it on 2026-12-06)."""
    from benchmarks.bench_daily import write_config
    from qarm_core.config import load_config

    for n_days in (2, 7, 12):
        cfgs = [load_config(write_config(tmp_path, d, str(tmp_path / "tiny_lm"), n_days)) for d in range(n_days)]
        assert all(c.storage.retention >= n_days for c in cfgs)
        assert [c.embed.reuse_model for c in cfgs] == [False] + [True] * (n_days - 1)
