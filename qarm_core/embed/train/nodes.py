"""The other nodes of a multi-node training run, found through a board on shared storage.

One node (node 0) runs the refresh flow; its train stage writes the run's job into the shared run
folder, posts the job on the board (``announced``) and starts its own launcher. Every other node
runs ``qarm train-node``, which waits for a posting (``wait_for_posting``) and starts its launcher
for the same job as node ``node_rank`` (``join_posted_job``). Only node 0 goes on to embed,
quantize and publish, so one node publishes.

The board is one JSON file (``POSTING``) rewritten in place by node 0: the job file, the world
(``nnodes`` x ``nproc``), a fresh id per launch and a heartbeat counter that node 0 advances every
``HEARTBEAT_S`` while its launch runs. A joining node judges liveness by its own clock (the counter
changed within ``STALE_S``), never by comparing its clock with node 0's, so clock skew between
hosts does not matter. The posting is withdrawn when node 0's launch ends; a node killed before
that leaves a posting whose counter no longer moves, which no node joins, and a node that joined
stops its launcher when the counter stops (its processes would otherwise wait on a dead
rendezvous for the launcher's timeout). A joining node leaves a marker (``joined.<id>.<rank>``), and
node 0 names in a warning the nodes that have not joined after ``JOIN_WARN_S``: its launcher waits
for them at the rendezvous. When its launcher has ended, a joined node leaves a second marker
(``left.<id>.<rank>``); node 0, its own launch done, keeps beating until every node that joined has
left (at most ``LEAVE_WAIT_S``), because its stage deletes the shared run folder once the model is
staged, and a joined node still reads its marks, its launch log and rank 0's last steps there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from qarm_core.embed.config import TrainConfig
from qarm_core.embed.train.launch import run_launched
from qarm_core.embed.train.record import STAGE
from qarm_core.errors import DataError, raise_if_stopped
from qarm_core.progress import Progress
from qarm_core.storage import write_json_atomic

log = logging.getLogger(__name__)

POSTING = "posting.json"
HEARTBEAT_S = 2.0       # how often node 0 advances the counter while its launch runs
STALE_S = 30.0          # a counter unchanged this long (by the reader's clock): node 0 is gone
JOIN_WARN_S = 60.0      # node 0 names the nodes that have not joined its launch after this long
LEAVE_WAIT_S = 60.0     # node 0's longest wait, after a launch that succeeded, for joined nodes to leave


@dataclass(frozen=True)
class Posting:
    """One launch of a multi-node job as node 0 posted it."""
    id: str
    job: str              # job.json in the shared run folder
    nnodes: int
    nproc: int
    host: str             # node 0's host name (for messages)
    beat: int             # node 0's heartbeat counter


def _read(board: Path) -> Posting | None:
    try:
        raw = json.loads((board / POSTING).read_text())
    except (FileNotFoundError, json.JSONDecodeError):     # none, or (non-atomic storage) mid-write
        return None
    return Posting(**{k: raw[k] for k in Posting.__dataclass_fields__})


def _joined_marker(board: Path, posting_id: str, node_rank: int) -> Path:
    return board / f"joined.{posting_id}.{node_rank}"


def _left_marker(board: Path, posting_id: str, node_rank: int) -> Path:
    return board / f"left.{posting_id}.{node_rank}"


def _wait_for_leavers(board: Path, posting_id: str, others: range, wait_s: float, poll_s: float = 0.1) -> list[int]:
    """Wait up to ``wait_s`` until every node of ``others`` that joined ``posting_id`` has left;
    returns the nodes still in it (their launchers did not end in time)."""
    deadline = time.monotonic() + wait_s
    while True:
        inside = [r for r in others if _joined_marker(board, posting_id, r).exists()
                  and not _left_marker(board, posting_id, r).exists()]
        if not inside or time.monotonic() >= deadline:
            return inside
        raise_if_stopped()              # a stop recorded while waiting ends the wait, as in a launch
        time.sleep(poll_s)


@contextlib.contextmanager
def announced(board: str | Path, job_file: str | Path, cfg: TrainConfig, heartbeat_s: float = HEARTBEAT_S,
              warn_after_s: float = JOIN_WARN_S, leave_wait_s: float = LEAVE_WAIT_S) -> Iterator[Posting]:
    """Post ``job_file`` on ``board`` for the other nodes and keep its heartbeat while the block
    runs (node 0's launch); withdraw it after, unless another launch has replaced it. Nodes that
    have not joined after ``warn_after_s`` are named in a warning, then once a minute: node 0's
    launcher waits for them at the rendezvous, and a node without ``qarm train-node`` never comes.
    After a block that succeeded, the heartbeat goes on until every node that joined has left (at
    most ``leave_wait_s``, then a warning): the caller deletes the run folder they still read."""
    board = Path(board)
    board.mkdir(parents=True, exist_ok=True)
    posting = Posting(id=uuid.uuid4().hex, job=str(Path(job_file).resolve()), nnodes=cfg.nnodes, nproc=cfg.nproc,
                      host=socket.gethostname(), beat=0)
    stop = threading.Event()
    others = range(1, cfg.nnodes)

    def post(beat: int) -> None:
        write_json_atomic(board / POSTING, {**posting.__dict__, "beat": beat, "pid": os.getpid()})

    def beat() -> None:
        n, t0, warned = 0, time.monotonic(), float("-inf")
        while not stop.wait(heartbeat_s):
            n += 1
            try:
                current = _read(board)
                if current is not None and current.id != posting.id:
                    return                                  # replaced by a newer launch
                post(n)
            except OSError as exc:
                # a storage hiccup (NFS, a full disk for a moment) must not end the heartbeat: the
                # joined nodes would stop a healthy run after STALE_S; the next beat tries again
                log.warning("train: could not advance the posting's heartbeat on %s: %s", board, exc)
                continue
            now = time.monotonic()
            if now - t0 >= warn_after_s and now - warned >= max(warn_after_s, 60.0):
                missing = [r for r in others if not _joined_marker(board, posting.id, r).exists()]
                if missing:
                    warned = now
                    log.warning("train: node(s) %s have not joined after %.0f s; node 0 waits for them at the "
                                "rendezvous: run `qarm train-node --node-rank R` there (same config, the home on "
                                "shared storage)", ", ".join(map(str, missing)), now - t0)

    post(0)
    log.info("train: posted the job for nodes 1..%d on %s (they join it with `qarm train-node`)",
             cfg.nnodes - 1, board)
    thread = threading.Thread(target=beat, name="qarm-train-posting", daemon=True)
    thread.start()
    ok = False
    try:
        yield posting
        ok = True
    finally:
        if ok:
            inside = _wait_for_leavers(board, posting.id, others, leave_wait_s)
            if inside:
                log.warning("train: node(s) %s joined the run but had not left %.0f s after node 0's launch "
                            "ended; the run folder is released anyway", ", ".join(map(str, inside)), leave_wait_s)
        stop.set()
        thread.join()
        current = _read(board)
        if current is not None and current.id == posting.id:
            (board / POSTING).unlink(missing_ok=True)
        for r in others:
            _joined_marker(board, posting.id, r).unlink(missing_ok=True)
            _left_marker(board, posting.id, r).unlink(missing_ok=True)


class Liveness:
    """Whether node 0 still beats, by this process's clock: a posting is alive once this reader has
    seen its counter advance, and while the last advance is no more than ``stale_s`` old."""

    def __init__(self, board: str | Path, stale_s: float = STALE_S):
        self.board, self.stale_s = Path(board), stale_s
        self.seen: tuple[str, int] | None = None
        self.changed_at = time.monotonic()
        self.moved = False          # the posting seen has beaten since this reader first saw it

    def look(self) -> tuple[Posting | None, bool]:
        """(the posting now, whether it is alive: its counter advanced since this reader first saw
        this posting, the last time no longer than ``stale_s`` ago)."""
        p = _read(self.board)
        now = time.monotonic()
        key = (p.id, p.beat) if p is not None else None
        if key != self.seen:
            self.moved = p is not None and self.seen is not None and self.seen[0] == p.id
            self.seen, self.changed_at = key, now
        return p, p is not None and self.moved and now - self.changed_at <= self.stale_s

    def stale(self) -> bool:
        return time.monotonic() - self.changed_at > self.stale_s


def wait_for_posting(board: str | Path, done: set[str], timeout_s: float | None = None, poll_s: float = 0.5,
                     stale_s: float = STALE_S, on_wait: Callable[[float], None] | None = None,
                     note_every_s: float = 300.0) -> Posting | None:
    """The next live posting on ``board`` whose id is not in ``done`` (a job this node already
    ran), or None after ``timeout_s``. ``on_wait(seconds waited)`` is called every ``note_every_s``
    (a node may wait days between weekly retrains)."""
    live = Liveness(board, stale_s)
    t0 = last_note = time.monotonic()
    while True:
        p, alive = live.look()
        if p is not None and alive and p.id not in done:
            return p
        now = time.monotonic()
        if timeout_s is not None and now - t0 > timeout_s:
            return None
        if on_wait is not None and now - last_note >= note_every_s:
            last_note = now
            on_wait(now - t0)
        raise_if_stopped()                  # a stop that landed outside the sleep (in logging) was recorded
        time.sleep(poll_s)


def join_posted_job(board: str | Path, posting: Posting, node_rank: int, stale_s: float = STALE_S,
                    timeout_s: float | None = None) -> float:
    """Start this node's launcher for ``posting``'s job as node ``node_rank`` and wait for it;
    returns the seconds it ran. The job's own training config is used (same world, port, seed),
    with this node's rank; the master address is the job's, else this node's ``MASTER_ADDR``.
    Stops the launcher (RuntimeError) when node 0's heartbeat stops for ``stale_s``."""
    job_file = Path(posting.job)
    try:
        job = json.loads(job_file.read_text())
    except FileNotFoundError:
        raise DataError(STAGE, "job", f"{job_file} is posted but not readable on this node: the home must be on "
                                      "storage every node mounts at the same path") from None
    cfg = TrainConfig.model_validate(job["train_config"])
    if not 0 < node_rank < cfg.nnodes:
        raise DataError(STAGE, "config", f"node_rank {node_rank} does not fit the posted job of {cfg.nnodes} nodes "
                                         f"(node 0 runs the refresh; the others are 1..{cfg.nnodes - 1})")
    cfg = cfg.model_copy(update={"node_rank": node_rank})
    write_json_atomic(_joined_marker(Path(board), posting.id, node_rank),
                      {"host": socket.gethostname(), "pid": os.getpid()})
    live = Liveness(board, stale_s)
    live.look()

    def node0_gone() -> str | None:
        p, _ = live.look()
        if p is not None and p.id != posting.id:
            return f"node 0 ({posting.host}) posted another launch"
        if live.stale():
            return f"node 0 ({posting.host}) stopped beating {stale_s:.0f} s ago"
        return None

    # rank 0 (on node 0) logs every step into the shared run folder: this node shows it too
    prog = Progress(STAGE, f"node {node_rank}: training steps", cfg.max_steps, "steps")

    def relay(info: dict) -> None:
        prog.advance(int(info["step"]) - prog.done, loss=round(float(info["loss"]), 4))

    t0 = time.perf_counter()
    try:
        run_launched(job_file, cfg, relay, timeout_s=timeout_s, abort=node0_gone, read_record=False)
    finally:
        # node 0 deletes the shared run folder once it staged the model: it waits for this marker
        try:
            write_json_atomic(_left_marker(Path(board), posting.id, node_rank), {"host": socket.gethostname()})
        except OSError as exc:          # node 0 then waits LEAVE_WAIT_S; the run's own outcome stands
            log.warning("train-node %d: could not mark leaving the run on %s: %s", node_rank, board, exc)
    prog.finish()
    return time.perf_counter() - t0


def check_refresh_node(cfg: TrainConfig) -> None:
    """A refresh runs on node 0 only (it posts the training job; the other nodes join it with
    ``qarm train-node``): one node embeds, quantizes and publishes."""
    if cfg.node_rank != 0:
        raise DataError(STAGE, "config", f"embed.train.node_rank is {cfg.node_rank}: a refresh runs on node 0 only; "
                                         f"node {cfg.node_rank} joins its training with `qarm train-node`")


def run_training_node(board: str | Path, node_rank: int, once: bool = False, wait_s: float | None = None,
                      stale_s: float = STALE_S, poll_s: float = 0.5) -> int:
    """Serve as node ``node_rank`` (>= 1) of the multi-node training runs that node 0's refreshes
    post on ``board``: wait for a posting, join it, and wait for the next (``once``: return after
    one). Returns the number of runs joined. A run that fails on this node is logged and not
    joined again (its node 0 reposts it when its refresh retries); with ``once`` it is raised as a
    DataError. ``wait_s``: the longest wait for a posting (None: no limit), then a DataError."""
    if node_rank < 1:
        raise DataError(STAGE, "config", f"node_rank {node_rank}: `qarm train-node` runs on nodes 1..nnodes-1 "
                                         "(node 0 runs the refresh); give --node-rank or embed.train.node_rank")
    done: set[str] = set()
    joined = 0
    while True:
        log.info("train-node %d: waiting for node 0 to post a training job on %s", node_rank, board)
        posting = wait_for_posting(board, done, wait_s, poll_s, stale_s,
                                   lambda s: log.info("train-node %d: still waiting (%.0f s)", node_rank, s))
        if posting is None:
            raise DataError(STAGE, "job", f"no training job was posted on {board} within {wait_s:g} s "
                                          "(node 0 posts one when its refresh reaches the train stage)")
        log.info("train-node %d: joining %s's job %s as node %d of %d (%d process(es) here)", node_rank,
                 posting.host, posting.job, node_rank, posting.nnodes, posting.nproc)
        done.add(posting.id)
        try:
            seconds = join_posted_job(board, posting, node_rank, stale_s)
        except (RuntimeError, OSError) as exc:     # OSError: the shared storage failed under the run
            if once:
                raise DataError(STAGE, "launch", f"node {node_rank}'s part of {posting.job} failed: {exc}") from exc
            log.error("train-node %d: the run failed on this node: %s", node_rank, exc)
            continue
        joined += 1
        log.info("train-node %d: done in %.0f s", node_rank, seconds)
        if once:
            return joined
