"""The ``qarm`` command line: run flows, ingest data, generate synthetic logs, inspect snapshots."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from flows.options import ConfigOpt, PoolOpt, SetOpt
from flows.options import parse_sets as _parse_sets
from flows.prefect_api import local_prefect_api
from flows.rank_cli import app as rank_app
from flows.runs_cli import app as runs_app
from qarm_core.config import PipelineConfig, dump_config, load_config
from qarm_core.errors import (STOPPED_BY, QarmError, Stopped, command_stop_handler, forget_stops, interruptible_at,
                              note_stop, record_stop_signals, stop_requested, stop_signal_name, stop_signals)
from qarm_core.gates import InteractionGate

# click's UsageError as typer raises it (typer bundles its own click): the parent of BadParameter,
# MissingParameter, NoSuchOption and "no such command".
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class OneLineUsageErrors(TyperGroup):
    """The ``qarm`` group: a refused option (bad value, out of range, missing, unknown) is one
    ``error: [stage=<command>, dataset=<option>]`` line and exit 2, like every other bad input,
    instead of click's boxed usage text."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except USAGE_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":      # a group called bare: its help, as before
                raise
            path = (exc.ctx.command_path if exc.ctx is not None else ctx.command_path).split()[1:]
            param = getattr(exc, "param", None)
            names = getattr(param, "opts", None) or ([param.name] if getattr(param, "name", None) else []) or \
                ([exc.option_name] if getattr(exc, "option_name", None) else [])
            where = f"[stage={'-'.join(path) or 'qarm'}, dataset={'/'.join(names) or 'command line'}]"
            message = " ".join(exc.format_message().split())
            console.print(f"[bold red]error:[/] {escape(where)} {escape(message)} "
                          f"({escape(' '.join(['qarm', *path, '--help']))})", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(help="qarm: QARM V2 item embeddings, Semantic IDs and ranking, as a Prefect DAG.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineUsageErrors)
ingest_app = typer.Typer()      # its help: the ingest_files callback's
app.add_typer(ingest_app, name="ingest")
pairs_app = typer.Typer(help="Mine item pairs outside the flow (writes a Parquet file).", no_args_is_help=True)
app.add_typer(pairs_app, name="pairs")
app.add_typer(rank_app, name="rank")
app.add_typer(runs_app, name="runs")
console = Console(stderr=True)


_DEBUG: ContextVar[bool] = ContextVar("qarm_debug", default=False)


@app.callback()
def _options(ctx: typer.Context,
             debug: bool = typer.Option(False, "--debug", help="Show tracebacks on the terminal too (a flow "
                                                               "command always writes them to <home>/logs/).")) -> None:
    token = _DEBUG.set(debug)
    ctx.call_on_close(lambda: _DEBUG.reset(token))      # for this command only


def _debug() -> bool:
    """Whether the command runs under ``qarm --debug``."""
    return _DEBUG.get()


def _quiet_env() -> None:
    for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                 "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        os.environ.setdefault(k, v)


# ---------------------------------------------------------------- a flow command's log file
# Prefect's console format with the date; a run's records name it (Prefect's PrefectFormatter)
LOG_FORMATS = {"format": "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s",
               "flow_run_fmt": "%(asctime)s | %(levelname)-7s | Flow run %(flow_run_name)r - %(message)s",
               "task_run_fmt": "%(asctime)s | %(levelname)-7s | Task run %(task_run_name)r - %(message)s"}
LOG_ATTR = "qarm_log_file"       # set on an error that left _run_log: the file holding its traceback


class _RunLog(logging.FileHandler):
    """A flow command's log file: what the terminal shows, with every traceback; notes which errors
    it logged (Prefect logs a failed run's error with its traceback)."""

    def __init__(self, path: Path):
        from prefect.logging.formatters import PrefectFormatter

        super().__init__(path, mode="x", encoding="utf-8")
        self.setFormatter(PrefectFormatter(**LOG_FORMATS))
        self.logged: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.logged.add(id(record.exc_info[1]))
        super().emit(record)


class _NoTraceback(logging.Filter):
    """Keeps a record that carries a traceback (Prefect's report of a failed task or flow run) off the
    terminal: it goes to the log file, and the command ends with one ``error:`` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ((record.exc_info and record.exc_info[0] is not None) or record.exc_text or record.stack_info)


def _new_log_file(home: str, command: str) -> _RunLog:
    """``<home>/logs/<command>-<UTC time>.log``, a new file for each run."""
    from datetime import datetime, timezone

    from qarm_core.storage import Storage

    logs = Storage(home).logs_dir
    logs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        try:
            return _RunLog(logs / (f"{command}-{stamp}.log" if n == 1 else f"{command}-{stamp}-{n}.log"))
        except FileExistsError:
            continue
    raise FileExistsError(f"{logs}: 1000 {command} logs at {stamp}")


def _terminal_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """(logger, handler) of every handler that writes to the terminal (Prefect's console, MLflow's)."""
    from rich.logging import RichHandler

    loggers = [logging.getLogger(), *(lg for lg in list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(lg, logging.Logger))]
    return [(lg, h) for lg in loggers for h in lg.handlers
            if isinstance(h, (logging.StreamHandler, RichHandler)) and not isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def _run_log(home: str, command: str) -> Iterator[Path]:
    """Log the block to ``<home>/logs/<command>-<time>.log``: every line the terminal shows, and the
    tracebacks, which (unless ``--debug``) stay off the terminal. An error leaving the block has its
    traceback in the file and the file's path in ``LOG_ATTR``, for ``_guard``'s one error line."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()              # Prefect's terminal handlers exist before they are filtered
    handler = _new_log_file(home, command)
    terminal = _terminal_handlers()
    # the root logger, and the loggers that print without passing records on to it (MLflow's)
    targets = [logging.getLogger(), *{id(lg): lg for lg, _ in terminal if not lg.propagate}.values()]
    quiet = None if _debug() else _NoTraceback()
    shown = list({id(h): h for _, h in terminal}.values()) if quiet is not None else []
    for lg in targets:
        lg.addHandler(handler)
    for h in shown:
        h.addFilter(quiet)
    try:
        yield Path(handler.baseFilename)
    except BaseException as exc:
        if id(exc) not in handler.logged:       # raised outside Prefect's logging (the lease, the CLI)
            info = (type(exc), exc, exc.__traceback__)
            if quiet is None:                   # --debug: on the terminal too, as Prefect's are
                logging.getLogger("qarm.cli").error("%s failed", command, exc_info=info)
            else:
                handler.handle(logging.makeLogRecord({"name": "qarm.cli", "levelno": logging.ERROR,
                                                      "levelname": "ERROR", "msg": f"{command} failed",
                                                      "exc_info": info}))
        with contextlib.suppress(AttributeError):
            setattr(exc, LOG_ATTR, Path(handler.baseFilename))
        raise
    finally:
        for h in shown:
            h.removeFilter(quiet)
        for lg in targets:
            lg.removeHandler(handler)
        handler.close()


def _checked_config(config: str, overrides: dict[str, Any]) -> PipelineConfig:
    """The resolved config, loaded before Prefect starts a server: a bad one fails in a second."""
    _quiet_env()
    return load_config(config, overrides).resolved()


# ---------------------------------------------------------------- the flows
def _run_refresh(config: str, overrides: dict[str, Any]) -> None:
    cfg = _checked_config(config, overrides)
    from flows.codebook_refresh import codebook_refresh
    from tasks.common import exclusive_home

    # the lease first: a busy home is refused here with one line (the flow takes the same lease)
    with _run_log(cfg.home, "refresh"), exclusive_home(cfg, "codebook-refresh"), local_prefect_api():
        summary = codebook_refresh(config_path=config, overrides=overrides or None)
    _print_published("codebook-refresh: published", summary["rows"], {})
    Console().print(f"snapshot  {summary['snapshot_id']}\npath      {summary['snapshot_path']}\n"
                    f"mlflow    run {summary['mlflow_run_id']}")


def _run_ingest(config: str, overrides: dict[str, Any]) -> None:
    cfg = _checked_config(config, overrides)
    from flows.ingest import FLOW, ingest
    from tasks.common import exclusive_home

    with _run_log(cfg.home, "ingest"), exclusive_home(cfg, FLOW), local_prefect_api():
        summary = ingest(config_path=config, overrides=overrides or None)
    _print_published("ingest: published (inputs only)", summary["rows"], summary["carried"])
    carried = f" (carried from {summary['carried_from']})" if summary["carried_from"] else ""
    Console().print(f"snapshot  {summary['snapshot_id']}{carried}\npath      {summary['snapshot_path']}\n"
                    f"mlflow    run {summary['mlflow_run_id']}\n"
                    "next      qarm refresh --set ingest.source=published   (with the same --config and --set)")


def _print_published(title: str, rows: dict[str, int], carried: dict[str, int]) -> None:
    table = Table(title=title)
    table.add_column("dataset")
    table.add_column("rows", justify="right")
    if carried:
        table.add_column("")
    for name, n in rows.items():
        table.add_row(name, f"{n:,}", *([""] if carried else []))
    for name, n in carried.items():
        table.add_row(name, f"{n:,}", "carried over")
    Console().print(table)


def _show_core_logs() -> None:
    """Commands that run core code outside a flow print its progress lines (``qarm_core.progress``:
    rows, rate, ETA) on the terminal; inside a flow Prefect's logging does it."""
    from rich.logging import RichHandler

    core = logging.getLogger("qarm_core")
    if not any(isinstance(h, RichHandler) for h in core.handlers):
        core.addHandler(RichHandler(console=console, show_path=False, show_level=False))
        core.setLevel(logging.INFO)
        core.propagate = False


def _stack_dump_on_sigusr1() -> bool:
    """`kill -USR1 <pid>` prints every thread's stack to stderr: what a command that seems stuck is
    doing. False where there is no SIGUSR1 or no stderr file descriptor to write to (in-process runs)."""
    import faulthandler
    import signal

    if not hasattr(signal, "SIGUSR1"):
        return False
    for stream in (sys.stderr, sys.__stderr__):
        try:
            faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True)
            return True
        except (AttributeError, OSError, ValueError):   # io.UnsupportedOperation: no fileno
            continue
    return False


@contextlib.contextmanager
def _stop_on_signals(ended: threading.Event):
    """Turn SIGTERM/SIGINT/SIGHUP into ``Stopped`` in the main thread, at once where the signal lands in
    our code or a compute library (``interruptible_at``), else at the next check (``raise_if_stopped``),
    so that the run unwinds within seconds: MLflow runs end FAILED with the signal in ``qarm.error``,
    Prefect marks its run crashed, the refresh lease is released and the local Prefect API server
    stops. A second signal
    exits at once; a command that has not set ``ended`` ``QARM_STOP_GRACE_S`` seconds after the stop
    is ended hard (``_exit_if_a_stop_hangs``)."""
    import signal

    got: list[int] = []

    def handler(signum, frame):
        if got:                         # a second signal: at once, the training launches' groups too
            _kill_launches()
            os._exit(128 + signum)
        got.append(signum)
        note_stop(signum)
        if interruptible_at(frame):
            raise Stopped(signum)
        # else inside a library (a database transaction, an HTTP call, a lock): the next progress
        # tick or stage start raises it (qarm_core.errors.raise_if_stopped). Said at once, so that
        # a terminal's user does not take the pause for a lost Ctrl-C; fd 2: no lock to wait on.
        with contextlib.suppress(OSError):
            os.write(2, f"{STOPPED_BY}{signal.Signals(signum).name}: ending at the next safe point "
                        "(a second signal ends it at once)\n".encode())

    grace_s = _stop_grace_s()
    forget_stops()
    old = {s: signal.signal(s, handler) for s in sorted(stop_signals())}
    dump_stacks = _stack_dump_on_sigusr1()
    try:
        # recorded even while another handler (Prefect's SIGTERM bridge in a flow run) has the signal
        with record_stop_signals(), command_stop_handler(handler):
            threading.Thread(target=_exit_if_a_stop_hangs, args=(ended, grace_s),
                             name="qarm-stop-watchdog", daemon=True).start()
            yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if dump_stacks:
            import faulthandler

            faulthandler.unregister(signal.SIGUSR1)


STOP_GRACE_ENV = "QARM_STOP_GRACE_S"
STOP_GRACE_S = 60.0


def _stop_grace_s() -> float:
    """How long a stopped command may take to unwind before it is ended hard (``QARM_STOP_GRACE_S``)."""
    raw = os.environ.get(STOP_GRACE_ENV, "")
    try:
        grace = float(raw) if raw else STOP_GRACE_S
    except ValueError:
        raise QarmError(f"{STOP_GRACE_ENV}={raw!r}: not a number of seconds") from None
    if not (grace > 0 and math.isfinite(grace)):
        raise QarmError(f"{STOP_GRACE_ENV}={raw!r}: must be a finite number of seconds > 0")
    return grace


def _exit_if_a_stop_hangs(ended: threading.Event, grace_s: float, poll_s: float = 0.5) -> None:
    """The watchdog of a command: once a stop signal is recorded, the command has ``grace_s`` seconds
    to end; past that it writes every thread's stack to stderr, kills its training launches' groups
    and exits 130 at once. Why: a stop's exception that lands inside a library's critical section
    can leave the unwinding waiting forever (seen in CI before stops were raised only where
    ``interruptible_at`` allows: a refresh waiting in SQLite's commit), and a stop that is only
    recorded waits for a check that some wait may not reach. What the hard exit leaves is what a
    SIGKILL leaves: the local Prefect API dies with its parent, and the next refresh takes over the
    dead holder's lease and marks its MLflow run failed."""
    while stop_requested() is None:
        if ended.wait(poll_s):
            return
    if ended.wait(grace_s):
        return
    import faulthandler

    # straight to file descriptor 2: the hung main thread may hold the locks of sys.stderr or the console
    with contextlib.suppress(Exception):
        os.write(2, f"\n{STOPPED_BY}{stop_requested()}: the run did not end within {grace_s:g} s of the stop "
                    f"({STOP_GRACE_ENV}), ended hard; the next run takes over its lease. Its threads:\n"
                 .encode())
        faulthandler.dump_traceback(file=2, all_threads=True)
    _kill_launches()
    os._exit(130)


def _kill_launches() -> None:
    """SIGKILL the process groups of this process's training launches: they run in sessions of their
    own, so a hard exit of ours would leave them training."""
    launch = sys.modules.get("qarm_core.embed.train.launch")
    if launch is not None:
        with contextlib.suppress(Exception):
            launch.kill_live_groups()


# Compiled extensions the refresh's stages import on first use. Imported before the stop handlers
# are installed: a signal that lands while an extension module initialises is turned into an
# ImportError by its C code ("numba._devicearray failed to import", seen once in 16 SIGTERMs at
# random moments), which no longer says that a signal stopped the run.
PRELOAD = ("numba", "torch", "transformers", "faiss", "duckdb", "great_expectations")


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


def _name_the_stop(sig: str) -> None:
    """Name the signal on the MLflow runs this process ended FAILED (``tracking.name_the_stop``): the
    error a run saw may have been raised while the signal was being handled, without it."""
    try:
        from tasks import tracking

        tracking.name_the_stop(sig)
    except Exception:  # noqa: BLE001 -- a stop still exits 130 if the tracking store is unreachable
        pass


def _guard(fn, *args) -> None:
    """Run a command: a QarmError ends it with one ``error:`` line and exit status 2 (its traceback is
    in the run's log file, which the line names, or with ``--debug`` on the terminal), a stop with
    exit status 130; anything else is a bug and propagates with its traceback."""
    ended = threading.Event()       # the watchdog's: the command, naming of the stop included, is over
    try:
        with _stop_on_signals(ended):
            fn(*args)
    except BaseException as exc:
        # A stop may surface as another error raised while Prefect handled the signal (see
        # stop_signal_name), or as one without a link to it (DuckDB's "Query interrupted"); it is
        # still a stop: exit 130, no traceback.
        sig = stop_signal_name(exc) or stop_requested()
        if sig is not None:
            _name_the_stop(sig)
            console.print(f"[bold red]{STOPPED_BY}{escape(sig)}[/]: the run was ended cleanly; rerun to resume "
                          "from its completed stages", highlight=False)
            raise typer.Exit(130) from None
        log = getattr(exc, LOG_ATTR, None)
        where = f"[dim](full log: {escape(str(log))})[/]" if log is not None else ""
        if isinstance(exc, QarmError):
            if _debug() and log is None:        # not shown by the run's logging: show it here
                import traceback

                console.print(escape("".join(traceback.format_exception(exc))), highlight=False, soft_wrap=True)
            console.print(f"[bold red]error:[/] {escape(str(exc))} {where}".rstrip(), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        if where:
            console.print(where, highlight=False, soft_wrap=True)
        raise
    finally:
        ended.set()


@app.command()
def refresh(config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Run the codebook-refresh flow, the whole pipeline: ingest, split, mine, judge, train, embed,
    quantize, each gated, then publish (on PREFECT_API_URL if set, else an ephemeral local API).
    After qarm ingest: --set ingest.source=published refreshes from the published inputs."""
    _preload()
    _guard(_run_refresh, config, _parse_sets(set_))


@app.command("train-node")
def train_node(config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt,
               node_rank: Optional[int] = typer.Option(None, "--node-rank", min=1,
                                                       help="This node's rank, 1..nnodes-1 (default: embed.train.node_rank)."),
               once: bool = typer.Option(False, "--once", help="Exit after one training run instead of waiting for the next."),
               wait_s: Optional[float] = typer.Option(None, "--wait-s", min=0.0,
                                                      help="Give up after waiting this long for a job (default: no limit).")
               ) -> None:
    """Join multi-node training as node 1..N-1: wait until node 0's refresh posts its training job
    (embed.train.nnodes > 1, the home on storage every node mounts at the same path), start this
    node's launcher for it, and wait for the next. Node 0 alone embeds, quantizes and publishes."""
    def serve() -> None:
        from qarm_core.embed.train.nodes import run_training_node
        from qarm_core.storage import Storage

        cfg = _checked_config(config, _parse_sets(set_))
        _show_core_logs()
        with _run_log(cfg.home, "train-node"):
            run_training_node(Storage(cfg.home).train_nodes_board,
                              node_rank if node_rank is not None else cfg.embed.train.node_rank, once, wait_s)
    _guard(serve)


@app.command()
def evaluate(config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt,
             rank: bool = typer.Option(True, "--rank/--no-rank", help="Also train and compare the ranking models."),
             out: Optional[Path] = typer.Option(None, help="Folder for report.md and the PNGs "
                                                          "(default: <home>/reports/<snapshot>)."),
             overwrite: bool = typer.Option(False, help="Replace --out if it is an earlier qarm output."),
             pool_with: Optional[list[str]] = PoolOpt) -> None:
    """Evaluate the published snapshot on its validation and test periods: embeddings, judge,
    quantizer, ranking; writes report.md + PNGs and logs them to one MLflow run."""
    def run() -> None:
        overrides = _parse_sets(set_)
        cfg = _checked_config(config, overrides)
        from flows.evaluate import check_pool_with
        from flows.evaluate import evaluate as evaluate_flow

        check_pool_with(pool_with, rank)

        command = " ".join(["qarm evaluate", *sys.argv[2:]]) if len(sys.argv) > 1 else "qarm evaluate"
        with _run_log(cfg.home, "evaluate"), local_prefect_api():
            out_info = evaluate_flow(config_path=config, overrides=overrides or None, rank=rank,
                                     out_dir=str(out) if out else None, command=command, overwrite=overwrite,
                                     pool_with=pool_with or None)
        Console().print(Path(out_info["report"]).read_text())
        Console().print(f"report    {out_info['report']}\nmlflow    run {out_info['mlflow_run_id']}")
    _guard(run)


INGEST_HELP = ("Runs the ingest flow: ingest, gate and publish only. The snapshot holds the new interactions "
               "and items, and carries over the current snapshot's judge and QA caches, model, embeddings and "
               "Semantic IDs unchanged; it has no time split, so rank and evaluate need a refresh first: "
               "qarm refresh --set ingest.source=published.")


@ingest_app.callback(invoke_without_command=True,
                     short_help="Ingest, gate and publish new data as an inputs snapshot (all: qarm refresh).",
                     help=f"Ingest your own files: qarm ingest --interactions FILE --items FILE. {INGEST_HELP}")
def ingest_files(ctx: typer.Context,
                 interactions: Optional[Path] = typer.Option(None, help="Interactions: .parquet, .csv, .tsv or a folder of .parquet."),
                 items: Optional[Path] = typer.Option(None, help="Items: .parquet, .csv, .tsv or a folder of .parquet."),
                 delimiter: str = typer.Option(",", help="CSV field separator."),
                 config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    if ctx.invoked_subcommand is not None:
        return
    if not (interactions and items):
        raise typer.BadParameter("give both --interactions and --items (or use: qarm ingest ml100k)")
    overrides = {"ingest.source": "files", "ingest.files.interactions": str(interactions),
                 "ingest.files.items": str(items), "ingest.files.csv_delimiter": delimiter,
                 **_parse_sets(set_)}
    _guard(_run_ingest, config, overrides)


@ingest_app.command("ml100k", short_help="Ingest ML-100K from the recbole wheel, gate it and publish it.",
                    help="Ingest ML-100K from the recbole wheel (downloaded once with pip, never "
                         f"installed). {INGEST_HELP}")
def ingest_ml100k(config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    _guard(_run_ingest, config, {"ingest.source": "ml100k", **_parse_sets(set_)})


STAGE_SYNTH = "synth"


@app.command()
def synth(out: Path = typer.Option(..., help="Output folder (created): gets interactions/ and items/ Parquet folders."),
          users: int = typer.Option(100_000, min=1), items: int = typer.Option(1_000_000, min=1),
          interactions: int = typer.Option(10_000_000, min=1), seed: int = typer.Option(0),
          zipf_exponent: float = typer.Option(1.1, min=0.01),
          overwrite: bool = typer.Option(False, help="Replace --out if it is an earlier qarm output.")) -> None:
    """Write a deterministic synthetic log (Zipf popularity, template item text), streamed to Parquet."""
    def run() -> None:
        from qarm_core.schemas import INTERACTIONS, ITEMS
        from qarm_core.storage import staged_output, write_parquet_dataset
        from qarm_core.synth import SynthSpec, iter_synthetic_interactions, iter_synthetic_items

        spec = SynthSpec(users=users, items=items, interactions=interactions, seed=seed, zipf_exponent=zipf_exponent)
        written = []
        # --out is the output folder: written in a new temporary folder beside it and renamed into
        # place when both datasets are complete (a failed or stopped run leaves no half a log), and
        # nothing but an earlier qarm output is ever replaced
        with staged_output(out, "folder", overwrite, STAGE_SYNTH) as tmp, \
                Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn(), console=console) as progress:
            for name, schema, gen, total in (("items", ITEMS, iter_synthetic_items, items),
                                             ("interactions", INTERACTIONS, iter_synthetic_interactions,
                                              interactions)):
                bar = progress.add_task(name, total=total)
                rec = write_parquet_dataset(tmp / name, _advancing(gen(spec), progress, bar), schema)
                written.append((name, rec))
        for name, rec in written:
            console.print(f"{name}: {rec.rows:,} rows in {len(rec.files)} file(s) at {out / name}")
    _guard(run)


STAGE_PAIRS_SWING = "pairs-swing"


@pairs_app.command("swing")
def pairs_swing(interactions: Path = typer.Option(..., help="Interactions: .parquet, .csv, .tsv or a folder of .parquet."),
                out: Path = typer.Option(..., help="Output Parquet file (src_item, dst_item, score, source)."),
                alpha1: Optional[float] = typer.Option(None, min=0.0), alpha2: Optional[float] = typer.Option(None, min=0.0),
                beta: Optional[float] = typer.Option(None, min=0.0),
                max_users_per_item: Optional[int] = typer.Option(None, min=2),
                min_user_items: Optional[int] = typer.Option(None, min=1),
                max_user_items: Optional[int] = typer.Option(None, min=1),
                top_k: Optional[int] = typer.Option(None, min=1), seed: Optional[int] = typer.Option(None),
                min_rating: Optional[float] = typer.Option(None, help="Only events rated >= this (or label 1)."),
                delimiter: str = typer.Option(",", help="CSV field separator."),
                rating_min: float = typer.Option(InteractionGate().rating_min, help="Gate: lowest valid rating."),
                rating_max: float = typer.Option(InteractionGate().rating_max, help="Gate: highest valid rating."),
                overwrite: bool = typer.Option(False, help="Replace --out if it is an earlier qarm output.")) -> None:
    """Swing item-to-item pairs, one row per directed top-k neighbour. Unset options take
    ``mine.swing``'s defaults (``SwingConfig``), as in a refresh. The interactions pass the refresh's
    interactions gate first (ids and times present, ratings finite and in range, one event per
    user, item and time)."""
    def run() -> None:
        _show_core_logs()
        import tempfile
        import time

        import pyarrow.parquet as pq

        from qarm_core.base import DuckDBConfig
        from qarm_core.errors import DataError
        from qarm_core.gates import GatesConfig, run_gate
        from qarm_core.ingest import iter_conformed
        from qarm_core.pairs.config import MineConfig, SwingConfig
        from qarm_core.pairs.mine import mine_pairs
        from qarm_core.schemas import INTERACTIONS
        from qarm_core.storage import (check_output, mark_output_table, read_dataset, staged_output,
                                       write_parquet_dataset)

        given = {"alpha1": alpha1, "alpha2": alpha2, "beta": beta, "max_users_per_item": max_users_per_item,
                 "min_user_items": min_user_items, "max_user_items": max_user_items, "top_k": top_k, "seed": seed}
        try:
            swing = SwingConfig(**{k: v for k, v in given.items() if v is not None})
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        check_output(out, "file", overwrite, STAGE_PAIRS_SWING)    # before any work
        t0 = time.perf_counter()
        try:
            gates = GatesConfig(interactions=InteractionGate(rating_min=rating_min, rating_max=rating_max))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        with tempfile.TemporaryDirectory(prefix="qarm_pairs_swing_") as tmp, \
                console.status("reading and checking the interactions"):
            try:
                rec = write_parquet_dataset(Path(tmp) / "interactions",
                                            iter_conformed(interactions, INTERACTIONS, delimiter), INTERACTIONS)
            except DataError as exc:   # this command's input, not the refresh's ingest
                raise DataError(STAGE_PAIRS_SWING, exc.dataset, exc.problem) from None
            run_gate(STAGE_PAIRS_SWING, rec, gates, DuckDBConfig(), tmp).raise_if_failed()
            events = read_dataset(rec)
        with console.status(f"mining Swing pairs over {events.num_rows:,} events"):
            try:
                table, _ = mine_pairs(events, None, MineConfig(sources=["swing"], swing=swing), min_rating)
            except DataError as exc:
                raise DataError(STAGE_PAIRS_SWING, exc.dataset, exc.problem) from None
        if table.num_rows == 0:
            raise DataError(STAGE_PAIRS_SWING, "pairs", f"no pairs: no item of the {events.num_rows:,} events has a "
                                                        "neighbour under these settings (min_user_items, min_rating?)")
        with staged_output(out, "file", overwrite, STAGE_PAIRS_SWING) as tmp:
            pq.write_table(mark_output_table(table, STAGE_PAIRS_SWING), tmp, compression="zstd")
        console.print(f"{table.num_rows:,} pairs for {len(set(table['src_item'].to_pylist())):,} items "
                      f"in {time.perf_counter() - t0:.1f}s -> {out}")
    _guard(run)


@app.command()
def quantize(embeddings: Path = typer.Option(..., help="Embeddings Parquet (item_id, vector) file or folder."),
             out: Path = typer.Option(..., help="Output folder: codes.parquet, codebook/, metrics.json."),
             levels: Optional[str] = typer.Option(None, help="K of the two residual k-means levels, e.g. 256,256 "
                                                             "(default: quantize.levels)."),
             fsq_dims: Optional[int] = typer.Option(None, min=1), fsq_levels: Optional[int] = typer.Option(None, min=2),
             seed: Optional[int] = typer.Option(None), niter: Optional[int] = typer.Option(None, min=1),
             previous: Optional[Path] = typer.Option(None, help="A previous output folder: warm start, "
                                                                 "sticky SIDs and churn."),
             frozen: bool = typer.Option(False, help="Encode with --previous's codebook without refitting."),
             overwrite: bool = typer.Option(False, help="Replace --out if it is an earlier qarm output.")) -> None:
    """Semantic IDs: two residual k-means levels (full batch) + an FSQ level; collision metrics.
    Unset options take the quantizer's defaults (``QuantizerParams``), as in a refresh."""
    def run() -> None:
        _show_core_logs()
        import pyarrow.parquet as pq

        from qarm_core.quantize.config import QuantizerParams
        from qarm_core.quantize.io import read_embeddings, read_model_version
        from qarm_core.quantize.quantizer import load_codebook, save_codebook
        from qarm_core.quantize.stage import quantize_stage
        from qarm_core.storage import check_output, staged_output, write_json_atomic

        given = {"fsq_dims": fsq_dims, "fsq_levels": fsq_levels, "seed": seed, "niter": niter}
        try:
            if levels is not None:
                given["levels"] = tuple(int(k) for k in levels.split(","))
            params = QuantizerParams(**{k: v for k, v in given.items() if v is not None})
        except ValueError as exc:
            raise typer.BadParameter(f"--levels/--fsq-*: {exc}") from None
        if frozen and previous is None:
            raise typer.BadParameter("--frozen needs --previous")
        check_output(out, "folder", overwrite, "quantize")     # before any work
        with console.status("reading embeddings"):
            ids, x = read_embeddings(embeddings)
            version = read_model_version(embeddings)
        prev_cb = load_codebook(previous / "codebook") if previous else None
        prev_codes = pq.read_table(previous / "codes.parquet") if previous else None
        mode = "frozen" if frozen else ("warm_start" if previous else "refit")
        with console.status(f"Semantic IDs ({mode}) for {len(x):,} items"):
            cb, codes, metrics, how = quantize_stage(x, ids, params, mode, prev_cb, prev_codes, model_version=version)
        console.print(f"quantize: {how}")
        # a new temporary folder beside --out, renamed into place: a failed run never leaves a
        # half-written output, and nothing but an earlier qarm output is ever replaced
        with staged_output(out, "folder", overwrite, "quantize") as tmp:
            pq.write_table(codes, tmp / "codes.parquet", compression="zstd")
            save_codebook(cb, tmp / "codebook")
            write_json_atomic(tmp / "metrics.json", metrics)
        table = Table(title=f"Semantic IDs for {len(ids):,} items -> {out}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k in ("raw.collision_rate", "raw.edge_num", "raw.hr@1", "raw.hr@10", "raw.decode_hr@1",
                  "raw.decode_hr@10", "resolved.collision_rate", "rkmeans.collision_rate", "rkmeans.decode_hr@1",
                  "level1.utilisation", "level2.utilisation", "level3.utilisation", "level3.mse", "churn"):
            if k in metrics:
                table.add_row(k, f"{metrics[k]:.4f}")
        Console().print(table)
    _guard(run)


bench_app = typer.Typer(help="Benchmarks on synthetic data.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("quantize")
def bench_quantize(n: int = typer.Option(10_000_000, "--n", min=1, help="Synthetic items."),
                   dim: int = typer.Option(128, min=1), levels: str = typer.Option("256,256", help="K of the two k-means levels."),
                   fsq_dims: int = typer.Option(4, min=1), fsq_levels: int = typer.Option(4, min=2),
                   seed: int = typer.Option(0), out: Optional[Path] = typer.Option(None, help="Keep codes.parquet here."),
                   overwrite: bool = typer.Option(False, help="Replace --out if it is an earlier qarm output."),
                   floor: bool = typer.Option(True, help="Measure the sgemm rate (~6 s) and print the FLOP floor."),
                   as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON.")) -> None:
    """Quantize N x DIM synthetic embeddings end to end (fit 2 x K full batch + FSQ, assign, resolve,
    metrics, write Parquet) in this process; print time, peak RSS and quality."""
    def run() -> None:
        _show_core_logs()
        from flows.bench_quantize import run_quantize_bench, sgemm_gflops
        from qarm_core.quantize.quantizer import QuantizerParams

        try:
            ks = tuple(int(k) for k in levels.split(","))
            QuantizerParams(levels=ks, fsq_dims=fsq_dims, fsq_levels=fsq_levels)
        except ValueError as exc:
            raise typer.BadParameter(f"--levels/--fsq-*: {exc}") from None
        if n < max(ks):
            raise typer.BadParameter(f"--n {n} is fewer than K={max(ks)}")
        from qarm_core.storage import staged_output

        keep = staged_output(out, "folder", overwrite, "bench-quantize") if out else contextlib.nullcontext(None)
        with keep as folder, console.status(f"quantizing {n:,} x {dim} synthetic embeddings"):
            r = run_quantize_bench(n, dim, ks, fsq_dims, fsq_levels, seed, out=folder)
        if floor:
            with console.status("measuring the sgemm rate"):
                g = sgemm_gflops()
            r["sgemm_gflops"] = g["gflops"]
            r["floor_seconds"] = 2.0 * sum(r["macs"].values()) / (g["gflops"] * 1e9)
        r["load_average"] = list(os.getloadavg())
        if as_json:
            sys.stdout.write(json.dumps(r, indent=2) + "\n")
            return
        table = Table(title=f"qarm bench quantize: {n:,} x {dim}, levels {'+'.join(map(str, ks))} + FSQ "
                            f"{fsq_levels}^{fsq_dims}")
        table.add_column("figure")
        table.add_column("value", justify="right")
        from qarm_core.devices import hardware_summary

        rows = [("seconds (quantize + Parquet)", f"{r['seconds']:.1f}"),
                ("CPU seconds, all threads", f"{r['cpu_seconds']:.1f}"),
                *[(f"  {k}", f"{v:.1f}") for k, v in r["stage_seconds"].items()],
                ("  parquet write", f"{r['parquet_seconds']:.1f}"),
                ("generation seconds (excluded)", f"{r['gen_seconds']:.1f}"),
                ("peak RSS GiB (process)", f"{r['peak_rss_gib']:.2f}"), ("embeddings GiB", f"{r['x_gib']:.2f}")]
        if floor:
            rows += [("sgemm GFLOP/s (this run)", f"{r['sgemm_gflops']:.1f}"),
                     ("FLOP floor seconds", f"{r['floor_seconds']:.1f}"),
                     ("measured / floor", f"{r['seconds'] / r['floor_seconds']:.2f}x"),
                     ("k-means + FSQ phases / floor",
                      f"{(r['stage_seconds']['kmeans'] + r['stage_seconds']['fsq']) / r['floor_seconds']:.2f}x")]
        rows += [("MSE by level", " / ".join(f"{v:.4f}" for v in r["mse_levels"])),
                 ("collision: k-means only", f"{r['rkmeans_collision']:.4f}"),
                 ("collision: raw (k-means + FSQ)", f"{r['collision']:.4f}"),
                 ("collision: after resolution", f"{r['resolved_collision']:.4f}"),
                 ("EdgeNum (raw)", f"{r['edge_num']:.3f}"),
                 ("Lloyd updates per level", ", ".join(str(f["lloyd_iterations"]) for f in r["fit_report"])),
                 ("load average 1/5/15 min", ", ".join(f"{v:.2f}" for v in r["load_average"])),
                 ("machine", hardware_summary())]
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
    _guard(run)


def _advancing(batches, progress: Progress, bar) -> Any:
    """Pass batches through, advancing a progress bar by their row counts."""
    for b in batches:
        yield b
        progress.advance(bar, b.num_rows)


@app.command()
def status(config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Show the published snapshot and the ones kept; an inputs snapshot (qarm ingest) is marked
    "inputs only"."""
    from qarm_core.storage import Storage

    def show() -> None:
        cfg = load_config(config, _parse_sets(set_)).resolved()
        st = Storage(cfg.home)
        cur = st.current()
        if cur is None:
            Console().print(f"nothing published yet under {st.home}")
            return
        table = Table(title=f"current snapshot {cur.snapshot_id}")
        for col in ("dataset", "rows", "schema", "fingerprint"):
            table.add_column(col)
        for name, meta in cur.manifest["datasets"].items():
            table.add_row(name, f"{meta['rows']:,}", f"v{meta['schema_version']}", meta["fingerprint"])
        Console().print(table)
        from tasks.ingest import SPLIT_DATASET

        if SPLIT_DATASET not in cur.manifest["datasets"]:   # no time split: `qarm ingest` (flows/ingest.py) published it
            parent = cur.manifest.get("meta", {}).get("parent_snapshot")
            carried = f"; the other datasets are carried over from {parent}" if parent else ""
            Console().print(f"inputs only: new interactions and items, not refreshed yet (no time split){carried}. "
                            "Run qarm refresh --set ingest.source=published before rank or evaluate.")
        Console().print("snapshots kept: " + ", ".join(st.list_snapshots()))
    _guard(show)


@app.command("config")
def show_config(config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt,
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the resolved config (environment overrides applied, paths absolute)."""
    def show() -> None:
        cfg = load_config(config, _parse_sets(set_)).resolved()
        sys.stdout.write(json.dumps(cfg.to_dict(), indent=2) + "\n" if as_json else dump_config(cfg))
    _guard(show)


if __name__ == "__main__":
    app()
