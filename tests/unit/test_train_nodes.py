"""The board through which node 0 of a multi-node training run posts its job and the other nodes
(``qarm train-node``) find and join it (``qarm_core.embed.train.nodes``). The two-node run through a
real refresh: tests/flows/test_codebook_refresh.py."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from qarm_core.embed.config import TrainConfig
from qarm_core.embed.train import launch, nodes
from qarm_core.errors import DataError

TWO_NODES = TrainConfig(batch_size=4, launcher="torchrun", nproc=1, nnodes=2, master_addr="127.0.0.1")


def _job(tmp_path: Path, cfg: TrainConfig = TWO_NODES) -> Path:
    """A job.json as ``launch.write_job`` writes it, enough for a joining node (out_dir, config)."""
    out = tmp_path / "run"
    (out / "job").mkdir(parents=True)
    job = out / "job" / "job.json"
    job.write_text(json.dumps({"out_dir": str(out), "train_config": cfg.model_dump()}))
    return job


def _wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_posting_beats_while_its_launch_runs_and_is_withdrawn_after(tmp_path):
    board = tmp_path / "board"
    job = _job(tmp_path)
    with nodes.announced(board, job, TWO_NODES, heartbeat_s=0.05) as posting:
        first = nodes._read(board)
        assert first is not None and first.id == posting.id and first.job == str(job.resolve())
        assert (first.nnodes, first.nproc) == (2, 1)
        _wait_until(lambda: nodes._read(board).beat >= first.beat + 3)
    assert not (board / nodes.POSTING).exists()


def test_a_newer_posting_is_neither_overwritten_nor_withdrawn_by_the_older(tmp_path):
    """Node 0's refresh retried: the second launch's posting replaces the first; the first's
    heartbeat and its end leave it alone."""
    board = tmp_path / "board"
    job = _job(tmp_path)
    older = nodes.announced(board, job, TWO_NODES, heartbeat_s=0.05)
    newer = nodes.announced(board, job, TWO_NODES, heartbeat_s=10.0)   # beats too slowly to show here
    older.__enter__()
    second = newer.__enter__()
    time.sleep(0.3)                                     # several of the older's heartbeats
    assert nodes._read(board) == second                 # not overwritten (beat 0: the newer's own)
    older.__exit__(None, None, None)
    assert nodes._read(board) == second                 # not withdrawn
    newer.__exit__(None, None, None)
    assert nodes._read(board) is None


def test_only_a_beating_posting_not_yet_run_is_joined(tmp_path):
    board = tmp_path / "board"
    board.mkdir()
    # a posting left by a killed node 0: its counter never moves
    dead = {"id": "dead", "job": str(_job(tmp_path)), "nnodes": 2, "nproc": 1, "host": "h", "beat": 7}
    (board / nodes.POSTING).write_text(json.dumps(dead))
    t0 = time.monotonic()
    assert nodes.wait_for_posting(board, set(), timeout_s=0.6, poll_s=0.05, stale_s=5.0) is None
    assert time.monotonic() - t0 >= 0.6
    with nodes.announced(board, tmp_path / "run" / "job" / "job.json", TWO_NODES, heartbeat_s=0.05) as posting:
        found = nodes.wait_for_posting(board, set(), timeout_s=5.0, poll_s=0.02)
        assert found is not None and found.id == posting.id
        # a job this node already ran is not joined again
        assert nodes.wait_for_posting(board, {posting.id}, timeout_s=0.4, poll_s=0.02) is None


def test_a_posting_whose_heartbeat_stops_goes_stale():
    live = nodes.Liveness(Path("/nonexistent-board"), stale_s=0.2)
    assert live.look() == (None, False) and not live.stale()
    time.sleep(0.3)
    assert live.stale()


def test_a_rank_outside_the_posted_world_or_node_0_is_refused(tmp_path):
    board = tmp_path / "board"
    with nodes.announced(board, _job(tmp_path), TWO_NODES, heartbeat_s=0.05) as posting:
        for rank in (0, 2):
            with pytest.raises(DataError, match=rf"node_rank {rank} does not fit the posted job of 2 nodes"):
                nodes.join_posted_job(board, posting, rank)
    with pytest.raises(DataError, match=r"stage=train, dataset=config.*runs on nodes 1..nnodes-1"):
        nodes.run_training_node(board, 0)
    with pytest.raises(DataError, match=r"dataset=config.*a refresh runs on node 0 only"):
        nodes.check_refresh_node(TWO_NODES.model_copy(update={"node_rank": 1}))
    nodes.check_refresh_node(TWO_NODES)


def test_a_posted_job_this_node_cannot_read_is_named(tmp_path):
    board = tmp_path / "board"
    with nodes.announced(board, tmp_path / "elsewhere" / "job.json", TWO_NODES, heartbeat_s=0.05) as posting:
        with pytest.raises(DataError, match=r"dataset=job.*not readable on this node.*same path"):
            nodes.join_posted_job(board, posting, 1)


def test_a_joined_launch_is_stopped_when_node_0_stops_beating(tmp_path, monkeypatch):
    """Node 0 killed mid-run: its posting stays but no longer beats. The joined node stops its
    launcher's whole process group instead of waiting on a dead rendezvous."""
    board = tmp_path / "board"
    job = _job(tmp_path)
    # the launcher and a worker of its group: a process that would run for a minute
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]
    monkeypatch.setattr(launch, "build_launch_command", lambda *a, **k: sleeper)
    posting = nodes.Posting(id="run-1", job=str(job), nnodes=2, nproc=1, host="node0", beat=0)
    killed = threading.Event()

    def node0_beats_then_dies() -> None:     # beats for a second; the posting stays on the board
        for beat in range(20):
            (board / nodes.POSTING).write_text(json.dumps({**posting.__dict__, "beat": beat}))
            time.sleep(0.05)
        killed.set()

    board.mkdir()
    (board / nodes.POSTING).write_text(json.dumps(posting.__dict__))
    threading.Thread(target=node0_beats_then_dies, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"node 0 \(.*\) stopped beating 1 s ago"):
        nodes.join_posted_job(board, posting, 1, stale_s=1.0)
    assert killed.is_set() and time.monotonic() - t0 < 15
    assert (tmp_path / "run" / "launch.node1.log").exists()
    assert nodes._read(board) is not None               # the killed node 0's posting is left as it was


def test_a_finished_launch_on_a_joined_node_returns_without_the_record(tmp_path, monkeypatch):
    """A joined node does not read train_record.json (node 0 publishes): a clean exit is enough,
    and the board is left empty (posting, joined and left markers withdrawn)."""
    board = tmp_path / "board"
    job = _job(tmp_path)
    monkeypatch.setattr(launch, "build_launch_command", lambda *a, **k: [sys.executable, "-c", "pass"])
    with nodes.announced(board, job, TWO_NODES, heartbeat_s=0.05) as posting:
        seconds = nodes.join_posted_job(board, posting, 1)
        assert nodes._joined_marker(board, posting.id, 1).exists()     # node 0 sees who joined
    assert 0 < seconds < 30
    assert not list(board.iterdir())                                    # posting and markers withdrawn


def test_node_0_names_the_nodes_that_have_not_joined(tmp_path):
    """Node 0's launcher waits at the rendezvous for every node: one that never runs `qarm
    train-node` would leave the refresh silent until the launcher's timeout."""
    board = tmp_path / "board"
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(nodes.__name__)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)     # setLevel: it clears the logger's cached isEnabledFor answers
    try:
        three = TWO_NODES.model_copy(update={"nnodes": 3})
        with nodes.announced(board, _job(tmp_path, three), three, heartbeat_s=0.05, warn_after_s=0.3,
                            leave_wait_s=0) as posting:
            nodes._joined_marker(board, posting.id, 1).write_text("{}")     # node 1 joined, node 2 did not
            _wait_until(lambda: any("have not joined" in m for m in seen))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert any("posted the job for nodes 1..2" in m for m in seen)
    warnings = [m for m in seen if "have not joined" in m]
    assert len(warnings) == 1 and warnings[0].startswith("train: node(s) 2 have not joined after")


def test_a_recorded_stop_ends_a_silent_launch_and_its_group(tmp_path, monkeypatch):
    """A stop whose exception was lost (``qarm_core.errors``) ends a launch within a second or two,
    also while the launch writes no log line (start-up, model loading): the whole process group is
    stopped and the launch leaves the registry the CLI's watchdog kills from."""
    import signal

    from qarm_core.embed.train.launch import LIVE_GROUPS, live_group_members
    from qarm_core.errors import Stopped, forget_stops, note_stop

    job = _job(tmp_path, TrainConfig(launcher="torchrun", nproc=2, batch_size=8))
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]
    monkeypatch.setattr(launch, "build_launch_command", lambda *a, **k: sleeper)
    pgids = []

    def stop_once_started() -> None:
        deadline = time.monotonic() + 30
        while not LIVE_GROUPS and time.monotonic() < deadline:
            time.sleep(0.05)
        pgids.extend(LIVE_GROUPS)
        time.sleep(0.5)
        note_stop(signal.SIGTERM)

    threading.Thread(target=stop_once_started, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Stopped):
            launch.run_launched(job, TrainConfig(launcher="torchrun", nproc=2, batch_size=8), timeout_s=60)
    finally:
        forget_stops()
    assert time.monotonic() - t0 < 20
    assert len(pgids) == 1 and live_group_members(pgids[0]) == [] and not LIVE_GROUPS


def _fake_launcher(out: Path, lines: int = 0, marks: tuple[int, ...] = (), remove_out: bool = False,
                   sleep_s: float = 0.0, code: int = 0) -> list[str]:
    """argv of a launcher stand-in: appends ``lines`` steps to rank 0's train_log.jsonl, marks
    ``marks`` done, optionally removes the run folder (node 0 staged the model), sleeps, exits ``code``."""
    script = f"""
import json, pathlib, shutil, time
out = pathlib.Path({str(out)!r})
with open(out / "train_log.jsonl", "a") as f:
    for step in range(1, {lines} + 1):
        f.write(json.dumps({{"step": step, "loss": 1.0 / step}}) + "\\n")
for r in {list(marks)!r}:
    (out / "ranks_done").mkdir(exist_ok=True)
    (out / "ranks_done" / f"rank-{{r:05d}}").write_text("x")
if {remove_out!r}:
    shutil.rmtree(out)
time.sleep({sleep_s})
raise SystemExit({code})
"""
    return [sys.executable, "-c", script]


NODE1 = TWO_NODES.model_copy(update={"node_rank": 1})


def test_a_joined_node_keeps_a_run_only_when_rank_0_finished_too(tmp_path, monkeypatch):
    """Node 1's ranks mark their work done before the run's last barrier; if rank 0 then fails to
    write the model, node 1's launcher exits non-zero with every mark of its own present: without
    rank 0's mark that is a failed run, with it a crash on the way out."""
    job = _job(tmp_path)
    out = tmp_path / "run"
    monkeypatch.setattr(launch, "build_launch_command", lambda *a, **k: _fake_launcher(out, marks=(1,), code=1))
    with pytest.raises(RuntimeError, match="failed with exit code 1"):
        launch.run_launched(job, NODE1, read_record=False)
    monkeypatch.setattr(launch, "build_launch_command", lambda *a, **k: _fake_launcher(out, marks=(0, 1), code=1))
    assert launch.run_launched(job, NODE1, read_record=False) is None
    # node 1's own marks are cleared before its launch: rank 0's mark alone is not enough
    monkeypatch.setattr(launch, "build_launch_command", lambda *a, **k: _fake_launcher(out, code=1))
    with pytest.raises(RuntimeError, match="failed with exit code 1"):
        launch.run_launched(job, NODE1, read_record=False)


def test_a_joined_node_whose_run_folder_was_removed_under_it_relays_its_steps_and_returns(tmp_path, monkeypatch):
    """Node 0 staged the model and removed the run folder while node 1's launcher was still on its
    way out (and crashed there): node 1 relays every step through its open handle and returns
    instead of failing on the missing launch log and marks."""
    job = _job(tmp_path)
    out = tmp_path / "run"
    monkeypatch.setattr(launch, "build_launch_command",
                        lambda *a, **k: _fake_launcher(out, lines=3, marks=(0, 1), sleep_s=0.6, code=1))
    steps: list[int] = []

    def progress(info: dict) -> None:
        steps.append(int(info["step"]))
        if len(steps) == 3:             # node 0 removes the folder now, the launcher still running
            shutil.rmtree(out)

    assert launch.run_launched(job, NODE1, progress, read_record=False) is None
    assert steps == [1, 2, 3] and not out.exists()
    # on node 0 (which reads the record) a missing folder is still a failure
    _job(tmp_path)
    monkeypatch.setattr(launch, "build_launch_command", lambda *a, **k: _fake_launcher(out, remove_out=True, code=1))
    with pytest.raises((RuntimeError, FileNotFoundError)):
        launch.run_launched(job, TWO_NODES)


def test_an_aborted_launch_whose_ranks_had_finished_is_kept(tmp_path, monkeypatch):
    """Node 0 withdrew its posting (its launch ended) while node 1's launcher lingered on its way
    out: every mark is there, so the abort stops the lingering group and keeps the run."""
    job = _job(tmp_path)
    out = tmp_path / "run"
    monkeypatch.setattr(launch, "build_launch_command",
                        lambda *a, **k: _fake_launcher(out, lines=2, marks=(0, 1), sleep_s=60))
    calls = {"n": 0}

    def abort() -> str | None:
        calls["n"] += 1
        return "node 0 stopped beating" if calls["n"] > 4 else None

    t0 = time.monotonic()
    assert launch.run_launched(job, NODE1, lambda info: None, abort=abort, read_record=False) is None
    assert time.monotonic() - t0 < 20
    # without the marks the same abort fails the launch
    monkeypatch.setattr(launch, "build_launch_command", lambda *a, **k: _fake_launcher(out, sleep_s=60))
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="training launch stopped: node 0 stopped beating"):
        launch.run_launched(job, NODE1, abort=abort, read_record=False)


def test_node_0_keeps_beating_until_the_joined_nodes_have_left(tmp_path):
    """Node 0's stage removes the shared run folder once its launch ended and the model is staged;
    a joined node may still be reading its marks, launch log and rank 0's last steps there. Node 0
    waits for every node that joined to leave (its heartbeat goes on meanwhile), at most
    ``leave_wait_s``; after a failed launch it does not wait."""
    board = tmp_path / "board"
    job = _job(tmp_path)
    beats: list[int] = []
    with nodes.announced(board, job, TWO_NODES, heartbeat_s=0.05, leave_wait_s=30) as posting:
        nodes._joined_marker(board, posting.id, 1).write_text("{}")

        def node1_leaves_later() -> None:
            time.sleep(0.6)
            beats.append(nodes._read(board).beat)
            time.sleep(0.3)
            beats.append(nodes._read(board).beat)
            nodes._left_marker(board, posting.id, 1).write_text("{}")

        leaver = threading.Thread(target=node1_leaves_later, daemon=True)
        leaver.start()
        t0 = time.monotonic()
    waited = time.monotonic() - t0
    leaver.join()
    assert 0.8 < waited < 10 and beats[1] > beats[0]          # it waited, and beat while waiting
    assert not list(board.iterdir())                            # posting and both markers withdrawn
    # a joined node that never leaves: bounded wait, named in a warning
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger(nodes.__name__).addHandler(handler)
    try:
        t0 = time.monotonic()
        with nodes.announced(board, job, TWO_NODES, heartbeat_s=0.05, leave_wait_s=0.3) as posting:
            nodes._joined_marker(board, posting.id, 1).write_text("{}")
        assert 0.3 <= time.monotonic() - t0 < 5
        # a failed launch: no wait
        t0 = time.monotonic()
        with pytest.raises(ValueError):
            with nodes.announced(board, job, TWO_NODES, heartbeat_s=0.05, leave_wait_s=30) as posting:
                nodes._joined_marker(board, posting.id, 1).write_text("{}")
                raise ValueError("node 0's launch failed")
        assert time.monotonic() - t0 < 5
    finally:
        logging.getLogger(nodes.__name__).removeHandler(handler)
    assert any("node(s) 1 joined the run but had not left" in m for m in seen)
    assert not list(board.iterdir())


def test_a_joined_node_relays_rank_0_steps_and_marks_leaving(tmp_path, monkeypatch):
    """``join_posted_job`` shows rank 0's steps from the shared log and, when its launcher has
    ended (here with a failure), leaves the marker node 0 waits for."""
    board = tmp_path / "board"
    job = _job(tmp_path)
    out = tmp_path / "run"
    shown: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    progress_log = logging.getLogger("qarm_core.progress")
    progress_log.addHandler(handler)
    old_level = progress_log.level
    progress_log.setLevel(logging.INFO)
    try:
        monkeypatch.setattr(launch, "build_launch_command", lambda *a, **k: _fake_launcher(out, lines=4))
        with nodes.announced(board, job, TWO_NODES, heartbeat_s=0.05, leave_wait_s=30) as posting:
            nodes.join_posted_job(board, posting, 1)
            assert nodes._left_marker(board, posting.id, 1).exists()
        monkeypatch.setattr(launch, "build_launch_command", lambda *a, **k: _fake_launcher(out, code=3))
        with nodes.announced(board, job, TWO_NODES, heartbeat_s=0.05, leave_wait_s=30) as posting:
            with pytest.raises(RuntimeError, match="exit code 3"):
                nodes.join_posted_job(board, posting, 1)
            assert nodes._left_marker(board, posting.id, 1).exists()
    finally:
        progress_log.removeHandler(handler)
        progress_log.setLevel(old_level)
    assert any(m.startswith("train: node 1: training steps done: 4 steps") and "loss 0.25" in m for m in shown), shown


def test_the_heartbeat_survives_a_storage_error(tmp_path, monkeypatch):
    """One failed write of the posting (NFS, a full disk for a moment) must not end the heartbeat:
    the joined nodes would stop a healthy run once it went stale."""
    board = tmp_path / "board"
    job = _job(tmp_path)
    real = nodes.write_json_atomic
    failed = {"n": 0}

    def flaky(path, obj):
        if obj.get("beat") == 2 and not failed["n"]:
            failed["n"] += 1
            raise OSError("Stale file handle")
        real(path, obj)

    monkeypatch.setattr(nodes, "write_json_atomic", flaky)
    with nodes.announced(board, job, TWO_NODES, heartbeat_s=0.05):
        _wait_until(lambda: nodes._read(board).beat >= 5)
    assert failed["n"] == 1
