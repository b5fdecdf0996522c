"""The refresh's pictures (qarm_core.plots) and one-page summary (qarm_core.summary)."""

import numpy as np
import pyarrow as pa
import pytest

from qarm_core.plots import code_levels, collision_by_level, plot_codes, plot_judge_scores, plot_loss_curves
from qarm_core.summary import refresh_summary_markdown


def test_collision_by_level_counts_items_that_share_a_prefix():
    c1 = np.array([0, 0, 0, 1, 2])
    c2 = np.array([0, 0, 1, 0, 0])
    c3 = np.array([5, 6, 7, 8, 9])
    # level 1: items 0-2 share c1=0 (3 of 5); level 2: items 0,1 share (0, 0); level 3: all distinct
    assert collision_by_level([c1, c2, c3]) == [0.6, 0.4, 0.0]
    assert collision_by_level([np.zeros(4, int)] * 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="c3"):
        code_levels(pa.table({"c1": [1], "c2": [1]}))


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    codes = pa.table({f"c{i}": rng.integers(0, k, 300) for i, k in ((1, 8), (2, 8), (3, 16))})
    judgments = pa.table({"source": ["swing"] * 200 + ["u2i"] * 100, "score": rng.normal(size=300),
                          "keep": rng.random(300) > 0.5})
    paths = [plot_codes(codes, (8, 8, 16), tmp_path / "codes.png", raw_collision=0.2),
             plot_judge_scores(judgments, tmp_path / "judge.png", thresholds={"swing": 0.1}),
             plot_loss_curves({"loss": [(1, 2.0), (2, 1.5)], "qa": []}, tmp_path / "loss.png")]
    for p in paths:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5000
    with_raw = codes.append_column("c3_raw", pa.array(rng.integers(0, 4, 300)))
    assert _png_size(plot_codes(with_raw, (8, 8, 16), tmp_path / "codes_raw.png"))[0] == 20 * 90   # 4 panels


def _png_size(path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG's IHDR chunk."""
    import struct

    return struct.unpack(">II", path.read_bytes()[16:24])


def test_the_ranking_plot_shows_each_difference_with_its_confidence_interval(tmp_path):
    """Beside the AUC (mean +- std over seeds), each model's AUC difference to the reference with
    its paired bootstrap CI; without differences (one model) the AUC panel alone."""
    from qarm_core.evaluation import plot_report

    rows = [{"model": "din", "auc_mean": 0.70, "auc_std": 0.01, "vs_ref": None},
            {"model": "ours", "auc_mean": 0.71, "auc_std": 0.01, "vs_ref": {"diff": 0.01, "lo": -0.002, "hi": 0.02}}]
    two = plot_report({"ranking": rows}, tmp_path / "a")["ranking"]
    one = plot_report({"ranking": rows[:1]}, tmp_path / "b")["ranking"]
    assert _png_size(two)[0] == 12 * 90 and _png_size(one)[0] == 7 * 90


def test_the_evaluation_report_shows_a_pooled_ranking_or_why_there_is_none():
    from qarm_core.evaluation import render_report

    rows = [{"model": "din", "runs": 6, "auc_mean": 0.79, "auc_std": 0.002, "vs_ref": None, "per_set": None},
            {"model": "ours_sid", "runs": 6, "auc_mean": 0.792, "auc_std": 0.003,
             "vs_ref": {"diff": 0.002, "lo": -0.0026, "hi": 0.0078, "p_le_0": 0.21}, "per_set": [0.0015, 0.0026]}]
    pooled = {"reference": "din", "reference_rule": "the best baseline by validation AUC averaged over the 2 "
              "comparisons din 0.7870", "rows": rows, "sources": ["this run", "/a/test_scores.npz"],
              "comparisons": 2, "error": None}
    text = render_report({"ranking_pooled": pooled}, {"snapshot_id": "s"})
    assert "## Ranking, pooled: 2 comparisons on the same samples" in text
    assert "against `din` (the best baseline by validation AUC averaged over the 2 comparisons din 0.7870)" in text
    assert "`this run`; `/a/test_scores.npz`" in text
    assert "| ours_sid | 6 | 0.7920 ± 0.0030 | +0.20 [-0.26, +0.78] | 0.210 | +0.15 / +0.26 |" in text
    assert "### Pooled: test users" not in text                  # scores files without the groups
    rows[1]["by_history"] = {"with_history": {"users": 90, "samples": 4439, "auc_mean": 0.78, "auc_std": 0.005,
                                              "vs_ref": {"diff": 0.008, "lo": 0.001, "hi": 0.016}}}
    rows[0].update(reference="din", by_history={"with_history": {"users": 90, "samples": 4439, "auc_mean": 0.772,
                                                                 "auc_std": 0.003, "vs_ref": None}})
    text = render_report({"ranking_pooled": pooled}, {"snapshot_id": "s"})
    assert "### Pooled: test users with and without events before the test period" in text
    assert "| ours_sid | 0.7800 ± 0.0050 | +0.80 [+0.10, +1.60] | n/a |  |" in text
    text = render_report({"ranking_pooled": {**pooled, "rows": [], "error": "reference 'din' is not in every "
                                                                          "comparison"}}, {"snapshot_id": "s"})
    assert "Not pooled: reference 'din' is not in every comparison" in text and "| ours_sid |" not in text


def test_summary_lists_metrics_gates_decisions_and_rows():
    text = refresh_summary_markdown("snap-1", {"items": 40, "codes": 40}, {"quantize.raw.collision_rate": 0.125},
                                    {"ingest/items": True, "quantize/codes": False}, {"quantize: quantize.how": "a|b"},
                                    "http://mlflow/#/experiments/1/runs/r1")
    assert text.startswith("# codebook refresh: snapshot `snap-1`")
    assert "MLflow run: http://mlflow/#/experiments/1/runs/r1" in text
    assert "Gates: 1 of 2 passed (failed: quantize/codes)" in text and "| quantize/codes | **failed** |" in text
    assert "| quantize.raw.collision_rate | 0.1250 |" in text and "| items | 40 |" in text
    assert "| quantize: quantize.how | a/b |" in text           # a '|' would break the table
    empty = refresh_summary_markdown("s", {}, {}, {}, {}, "-")
    assert "(none logged)" in empty and "Gates: 0 of 0 passed" in empty
