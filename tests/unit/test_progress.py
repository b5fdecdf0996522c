"""Progress lines: a start line, then at most one per interval with rate and ETA, and a closing line."""

import logging

from qarm_core.progress import Progress, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_at_a_steady_pace_with_rate_and_eta():
    clock, lines = Clock(), []
    p = Progress("judge", "scoring pairs", 1000, "pairs", every_s=10, emit=lines.append, clock=clock)
    assert lines == ["judge: scoring pairs: 1,000 pairs to do"]
    for _ in range(9):                  # 9 batches of 25 pairs, 1 s apart: no line before 10 s
        clock.t += 1
        p.advance(25)
    assert len(lines) == 1
    clock.t += 1
    p.advance(25, loss=2.5)             # 10 s, 250 pairs: 25 pairs/s, 750 left -> 30 s
    assert lines[-1] == "judge: scoring pairs 250/1,000 (25%), 25.0 pairs/s, ETA 30s, loss 2.5"
    clock.t += 5
    p.advance(100)                      # within the interval: silent
    assert len(lines) == 2
    clock.t += 30
    p.advance(650)
    p.finish()
    p.finish()                          # once only
    assert lines[-1].startswith("judge: scoring pairs done: 1,000 pairs in 45s (22.2 pairs/s)")
    assert len(lines) == 4


def test_slow_units_show_seconds_per_unit_and_unknown_totals():
    clock, lines = Clock(), []
    p = Progress("train", "steps", None, "steps", every_s=0, emit=lines.append, clock=clock)
    clock.t += 8
    p.advance(2)
    assert lines[-1] == "train: steps 2, 4.0 s/step"


def test_logs_to_the_qarm_core_logger_by_default(caplog):
    with caplog.at_level(logging.INFO, logger="qarm_core"):
        with Progress("embed", "embedding items", 3, "items", every_s=0) as p:
            p.advance(3)
    assert [r.name for r in caplog.records] == ["qarm_core.progress"] * 3
    assert "embed: embedding items done: 3 items" in caplog.records[-1].getMessage()


def test_format_duration():
    assert (format_duration(42), format_duration(75), format_duration(3725)) == ("42s", "1m15s", "1h02m")


def test_quiet_work_logs_only_when_it_lasts():
    clock, lines = Clock(), []
    with Progress("gate", "row checks", 10, "rows", every_s=10, emit=lines.append, clock=clock, quiet=True) as p:
        p.advance(10)
    assert lines == []                  # short: silent
    with Progress("gate", "row checks", 10, "rows", every_s=10, emit=lines.append, clock=clock, quiet=True) as p:
        clock.t += 12
        p.advance(10)
    assert len(lines) == 2 and lines[-1].startswith("gate: row checks done: 10 rows in 12s")


def test_seconds_per_unit_name_a_single_unit():
    from qarm_core.progress import singular

    assert [singular(u) for u in ("steps", "passes", "items", "batches", "pairs", "s")] == \
        ["step", "pass", "item", "batch", "pair", "s"]
