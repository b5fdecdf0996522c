"""bench_daily's sampling of each day's LLM pairs (the judge's rate is measured on them)."""

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
