"""Multi-process launch: a run's job (inputs as Parquet, configs as JSON), the torchrun / deepspeed
launcher command, the workers' environment, and the launched run's progress relayed from its log.

Multi-node: every node runs the same launch (the same config but ``node_rank``) into the same run
folder, which must be on a filesystem all nodes share: DeepSpeed writes each rank's ZeRO partition
of a checkpoint there and reads them all back (resume, export), rank 0 writes the model, the log
and the record that every node's launch returns."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

import pyarrow as pa

from qarm_core.embed.config import EmbedModelConfig, TrainConfig
from qarm_core.embed.train.distributed import REPO
from qarm_core.embed.train.loop import train_in_process
from qarm_core.embed.train.record import STAGE, ProgressFn, TrainRecord, rank_done_file
from qarm_core.errors import DataError, raise_if_stopped

logger = logging.getLogger(__name__)


# Where node 0 is when neither the config nor the environment says: this host (one node).
LOCAL_MASTER_ADDR = "127.0.0.1"
HOSTFILE = "hostfile"       # the DeepSpeed launcher's hostfile of a multi-node job, next to job.json


def resolve_master_addr(cfg: TrainConfig, env: Mapping[str, str] | None = None) -> str:
    """Node 0's address: ``cfg.master_addr``; else, on several nodes, ``MASTER_ADDR`` of ``env``
    (default: this process's environment, e.g. set by a cluster scheduler); else, on one node,
    ``LOCAL_MASTER_ADDR`` (a MASTER_ADDR left in the environment by another job must not send a
    one-node run's processes to another host). Several nodes with no address given is a DataError:
    the other nodes' processes would wait for a rendezvous on their own loopback until the
    launcher's timeout."""
    env = os.environ if env is None else env
    if cfg.master_addr:
        return cfg.master_addr
    if cfg.nnodes == 1:
        return LOCAL_MASTER_ADDR
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    raise DataError(STAGE, "config", f"embed.train.nnodes={cfg.nnodes} but no address of node 0: set "
                                     "embed.train.master_addr or MASTER_ADDR (the same on every node)")


def deepspeed_hostfile(cfg: TrainConfig) -> str:
    """The hostfile the DeepSpeed launcher reads on every node of a multi-node run: ``nnodes``
    lines of ``nproc`` slots. Without ssh (``--no_ssh``) the names are only labels: each node's
    launcher starts its own ``nproc`` processes, ranks follow from the line order and
    ``--node_rank``, and the processes meet at ``--master_addr``."""
    return "".join(f"node{i} slots={cfg.nproc}\n" for i in range(cfg.nnodes))


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a fresh temporary file next to ``path``, then rename it over ``path``: every
    node of a run writes the same job into the shared run folder, and a reader (another node's
    worker) must see a whole file, old or new, never one being written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)        # mkstemp's 0600 would hide the job from the other nodes' users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_job(items: pa.Table, judgments: pa.Table, qa: pa.Table | None, out_dir: str | Path,
              model_cfg: EmbedModelConfig, cfg: TrainConfig, reference: pa.Table | None = None) -> Path:
    """Write the inputs (Parquet) and configs (JSON) of a run to ``out_dir/job`` (and the DeepSpeed
    hostfile of a multi-node run); returns job.json. Safe to run on every node at once."""
    import pyarrow.parquet as pq

    job_dir = Path(out_dir) / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    tables = {"items": items, "judgments": judgments, "qa": qa, "reference": reference}
    for name, table in tables.items():
        if table is not None:
            _write_atomic(job_dir / f"{name}.parquet", lambda f, t=table: pq.write_table(t, f))
    if cfg.launcher == "deepspeed" and cfg.nnodes > 1:
        _write_atomic(job_dir / HOSTFILE, lambda f: f.write_text(deepspeed_hostfile(cfg)))
    job = {"out_dir": str(Path(out_dir).resolve()), "items": str(job_dir / "items.parquet"),
           "judgments": str(job_dir / "judgments.parquet"),
           "qa": str(job_dir / "qa.parquet") if qa is not None else None,
           "reference": str(job_dir / "reference.parquet") if reference is not None else None,
           "model_config": model_cfg.model_dump(), "train_config": cfg.model_dump()}
    f = job_dir / "job.json"
    _write_atomic(f, lambda t: t.write_text(json.dumps(job, indent=2)))
    return f


def run_job(job_file: str | Path) -> None:
    """Train the run described by ``job_file`` (written by ``write_job``) in this process: the entry
    point of each process a launcher starts (rank and world from its environment)."""
    import pyarrow.parquet as pq

    job = json.loads(Path(job_file).read_text())
    model_cfg = EmbedModelConfig.model_validate(job["model_config"])
    cfg = TrainConfig.model_validate(job["train_config"])
    items = pq.read_table(job["items"])
    judgments = pq.read_table(job["judgments"])
    qa = pq.read_table(job["qa"]) if job.get("qa") else None
    reference = pq.read_table(job["reference"]) if job.get("reference") else None
    train_in_process(items, judgments, qa, Path(job["out_dir"]), model_cfg, cfg, None, reference)


def node_ranks(cfg: TrainConfig) -> range:
    """The global ranks this node's launch starts: both launchers number ranks node by node,
    ``nproc`` per node, in ``node_rank`` order."""
    return range(cfg.node_rank * cfg.nproc, (cfg.node_rank + 1) * cfg.nproc)


def build_launch_command(job_file: str | Path, cfg: TrainConfig, python: str | None = None,
                         extra_launcher_args: list[str] | None = None) -> list[str]:
    """argv that runs ``qarm_core.embed.worker job_file`` in ``cfg.nproc`` processes on this node,
    node ``cfg.node_rank`` of ``cfg.nnodes`` (every node runs its own; A = ``resolve_master_addr``).

    torchrun: ``python -m torch.distributed.run --nnodes N --node_rank R --master_addr A
    --master_port P --nproc_per_node n -m qarm_core.embed.worker JOB`` (static rendezvous: node 0
    hosts it at A:P). deepspeed: ``python -m deepspeed.launcher.runner --num_gpus n --num_nodes N
    --node_rank R --master_addr A --master_port P --module qarm_core.embed.worker JOB`` (on CPU hosts
    --num_gpus is the process count; it passes ``--local_rank=i`` to each worker). One node: the
    DeepSpeed launcher uses this host's devices and 127.0.0.1. Several nodes: it needs a hostfile
    (``write_job`` writes ``job/hostfile``), and with one it would start the other nodes itself over
    pdsh/ssh, so the command adds ``--no_ssh --hostfile job/hostfile``: each node starts its own
    processes, like torchrun. ``extra_launcher_args`` come last (argparse: a repeated flag wins).
    """
    py = python or sys.executable
    extra = list(extra_launcher_args or [])
    addr, port = resolve_master_addr(cfg), str(cfg.master_port)
    if cfg.launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nnodes", str(cfg.nnodes), "--node_rank", str(cfg.node_rank),
                "--master_addr", addr, "--master_port", port, "--nproc_per_node", str(cfg.nproc), *extra,
                "-m", "qarm_core.embed.worker", str(job_file)]
    if cfg.launcher == "deepspeed":
        multi = ["--no_ssh", "--hostfile", str(Path(job_file).parent / HOSTFILE)] if cfg.nnodes > 1 else []
        return [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg.nproc), "--num_nodes", str(cfg.nnodes),
                "--node_rank", str(cfg.node_rank), "--master_addr", addr, "--master_port", port, *multi, *extra,
                "--module", "qarm_core.embed.worker", str(job_file)]
    raise ValueError(f"launcher {cfg.launcher!r} starts no processes")


def launch_env(cfg: TrainConfig) -> dict[str, str]:
    """The environment of launched workers: this one, plus one BLAS/OpenMP thread pool per process
    sized so the processes share the cores instead of oversubscribing them, with passive waits."""
    env = dict(os.environ)
    threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // cfg.nproc)
    env["OMP_NUM_THREADS"] = str(threads)
    # passive OpenMP waits: spinning threads of co-located processes slowed training ~10x here
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("PYTHONPATH", str(REPO))
    if str(REPO) not in env["PYTHONPATH"].split(os.pathsep):
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env["PYTHONPATH"]
    return env


# A JIT build of a DeepSpeed op (the shared-memory allreduce of ranks on one CPU host, ~1 min on its
# first run) holds a lock file open while it compiles; a build killed meanwhile leaves the file, and
# torch then waits on it forever, silently, in every later launch on that host (seen here after a
# killed test). A lock older than this that no process on this host holds open is such a leftover.
STALE_BUILD_LOCK_S = 900.0


def _held_open(paths: list[Path]) -> set[Path]:
    """Those of ``paths`` that a process of this host has open (read from /proc; every path counts
    as held where /proc cannot be read, so nothing is removed on a guess)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return set(paths)
    wanted = {str(p.resolve()): p for p in paths}
    held: set[Path] = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:             # a process that ended, or another user's
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:         # closed meanwhile
                continue
            if target in wanted:
                held.add(wanted[target])
    return held


def clear_stale_build_locks(env: Mapping[str, str], max_age_s: float = STALE_BUILD_LOCK_S,
                            now: float | None = None) -> list[Path]:
    """Remove the ``lock`` files that killed builds left in torch's extension root as launched
    workers see it (``TORCH_EXTENSIONS_DIR`` of ``env``, else torch's default root and its
    per-build folders): older than ``max_age_s`` and open in no process of this host (a build
    holds its lock open until it ends). Returns the paths removed, each logged; a lock that
    cannot be read or removed is logged and left (the launch goes on as it would have)."""
    root = env.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    now = time.time() if now is None else now
    age: dict[Path, float] = {}
    for lock in [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]:
        try:
            if now - lock.stat().st_mtime > max_age_s:
                age[lock] = now - lock.stat().st_mtime
        except OSError:             # gone meanwhile (a build finished), or unreadable
            continue
    removed = []
    for lock in (set(age) - _held_open(list(age))) if age else ():
        try:
            lock.unlink()
        except OSError as exc:
            logger.warning("could not remove %s, which looks left by a build that did not finish (a launch "
                           "that builds that op waits on it): %s", lock, exc)
            continue
        removed.append(lock)
        logger.warning("removed %s, left by a build that did not finish (open in no process, %.0f min old; a "
                       "launch would have waited on it forever)", lock, age[lock] / 60)
    return sorted(removed)


def live_group_members(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that still run (zombies excluded: a worker whose
    launcher died waits for init to reap it). Without /proc: the group's existence, by signal 0."""
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    live = []
    for d in proc_root.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()     # after "pid (comm) "
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            live.append(int(d.name))
    return live


# The process groups of the launches running in this process (their leaders' pids): what a command
# ended hard (flows.cli's stop watchdog) kills first, since they run in sessions of their own.
LIVE_GROUPS: set[int] = set()


def kill_live_groups() -> None:
    """SIGKILL every live launch's process group, at once (the hard end of a stopped command)."""
    import signal

    for pgid in list(LIVE_GROUPS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0, kill_wait_s: float = 5.0) -> None:
    """SIGTERM to the launcher's process group (launcher and workers); SIGKILL to whatever of the
    group is left after ``grace_s``; then wait (up to ``kill_wait_s``) until the killed processes
    are gone, since SIGKILL is delivered asynchronously and a process can still run its exit for
    a moment after kill() returns."""
    import signal

    def group_alive() -> bool:
        proc.poll()                    # reap the launcher, or it stays in the group as a zombie
        return bool(live_group_members(proc.pid))

    def send(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    if group_alive():
        send(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive():
            send(signal.SIGKILL)
            deadline = time.monotonic() + kill_wait_s
            while group_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
    proc.wait()


def finished_before_exit(out: Path, cfg: TrainConfig) -> bool:
    """Whether every rank this node launched into ``out`` marked its work done (``mark_rank_done``:
    its steps and checkpoints finished), and so did rank 0, which marks after writing the model and
    the record: on a node other than 0 the local ranks mark before the last barrier, and a rank 0
    that failed to write the model must not leave them a finished run. Rank 0's mark cannot be a
    stale one: node 0 clears it before its launch, and no rank marks before the rendezvous."""
    return all(rank_done_file(out, r).is_file() for r in {0, *node_ranks(cfg)})


class LogRelay:
    """The lines added to a JSON-lines log since byte ``start``, read through one handle opened as
    soon as the file exists: an open file survives its folder being removed (node 0's stage removes
    the run folder once the model is staged; it waits for the joined nodes to leave since, but a
    node that outlives that wait still reads its handle). Seen once in CI before both: a joining
    node relayed none of the run's steps. A partial last line waits; a read that fails (a stale
    handle on NFS) relays nothing this time: the lines only show progress."""

    def __init__(self, path: Path, start: int = 0):
        self.path, self.start = path, start
        self._f = None
        self._pending = b""

    def poll(self) -> list[dict]:
        if self._f is None:
            try:
                self._f = open(self.path, "rb")
            except FileNotFoundError:
                return []
            self._f.seek(self.start)
        try:
            self._pending += self._f.read()
        except OSError:
            return []
        done = self._pending.rfind(b"\n") + 1
        lines, self._pending = self._pending[:done].splitlines(), self._pending[done:]
        return [json.loads(line) for line in lines]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def run_launched(job_file: Path, cfg: TrainConfig, progress: ProgressFn | None = None,
                 timeout_s: float | None = None, abort: Callable[[], str | None] | None = None,
                 read_record: bool = True) -> TrainRecord | None:
    """Start the multi-process run of ``job_file``, relay progress from its train_log.jsonl, wait,
    and return the record rank 0 wrote (None with ``read_record=False``: a node other than node 0,
    which does not publish). A launch that exits non-zero, times out or is aborted after every rank
    of this node and rank 0 marked their work done (``finished_before_exit``) is kept, with a
    warning. A failed launch raises RuntimeError with the output tail; so does ``abort()`` returning
    a reason (checked every 0.25 s), after stopping the run."""
    job = json.loads(Path(job_file).read_text())
    out = Path(job["out_dir"])
    log = out / "train_log.jsonl"
    seen = log.stat().st_size if log.exists() else 0
    cmd = build_launch_command(job_file, cfg, extra_launcher_args=cfg.launcher_args)
    # the launcher's and its workers' output; one file per node (the run folder is shared)
    out_log = out / ("launch.log" if cfg.nnodes == 1 else f"launch.node{cfg.node_rank}.log")
    for rank in node_ranks(cfg):        # this launch's ranks mark themselves done afresh
        rank_done_file(out, rank).unlink(missing_ok=True)
    env = launch_env(cfg)
    clear_stale_build_locks(env)
    t0 = time.perf_counter()
    with open(out_log, "wb") as lf:
        # its own process group: stopping the run stops the launcher's workers too, not just the launcher
        proc = subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT, cwd=str(REPO),
                                start_new_session=True)
        LIVE_GROUPS.add(proc.pid)
        relay = LogRelay(log, seen) if progress else None
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.25)
                except subprocess.TimeoutExpired:
                    rc = None
                if relay is not None:
                    for info in relay.poll():
                        progress(info)
                if rc is not None:
                    break
                timed_out = timeout_s is not None and time.perf_counter() - t0 > timeout_s
                why = abort() if abort is not None and not timed_out else None
                why = f"timed out after {timeout_s}s" if timed_out else f"stopped: {why}" if why else None
                if why:
                    _stop_group(proc)
                    if finished_before_exit(out, cfg):  # the work was done; only the exit lingered
                        logger.warning("training launch %s after every rank had finished its work: the run "
                                       "is kept; see %s", why, out_log)
                        rc = 0
                        break
                    raise RuntimeError(f"training launch {why}; see {out_log}")
                raise_if_stopped()      # a stop whose exception was lost, also while no log line comes
        except BaseException:
            _stop_group(proc)
            raise
        finally:
            LIVE_GROUPS.discard(proc.pid)
            if relay is not None:
                relay.close()
    if rc != 0:
        try:
            tail = out_log.read_text(errors="replace")[-3000:]
        except OSError as exc:          # the run folder went away with the log in it
            tail = f"(launch log unreadable: {exc})"
        if not read_record and not out.exists():
            # node 0 removes the run folder only once it has staged the model (after waiting for
            # the joined nodes to leave, at most nodes.LEAVE_WAIT_S): the run succeeded there
            logger.warning("training launch (node %d) exited with code %s after node 0 had staged the run's "
                           "model and removed its folder: a crash on the way out, not counted as a failure",
                           cfg.node_rank, rc)
            return None
        if not finished_before_exit(out, cfg):
            raise RuntimeError(f"training launch {' '.join(cmd)} failed with exit code {rc}:\n{tail}")
        # Seen once in CI (2 gloo ranks, 2 loaded cores): a rank aborted late in a run with a C++
        # "terminate called without an active exception", cause not found. After every rank's mark
        # the run's output is complete: failing the stage would make a retry read the same record.
        logger.warning("training launch exited with code %s after every rank of node %d had finished its "
                       "work (model and record written): a crash on the way out, the run is kept. "
                       "See %s; its tail:\n%s", rc, cfg.node_rank, out_log, tail)
    if not read_record:
        return None
    return TrainRecord(**json.loads((out / "train_record.json").read_text()))
