"""The qarm command line, in-process, against the test harness's Prefect API."""

import contextlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from qarm_core.storage import Storage, read_dataset
from tests.support.paths import TINY

runner = CliRunner()


SYNTH_TINY = ["synth", "--users", "5", "--items", "20", "--interactions", "200"]


def test_synth_writes_the_out_folder_as_one_qarm_output(tmp_path):
    from qarm_core.storage import is_qarm_output

    out = tmp_path / "new" / "s"                      # the parent is created too, as before
    res = runner.invoke(app, SYNTH_TINY + ["--out", str(out), "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert pq.read_table(out / "interactions").num_rows == 200 and pq.read_table(out / "items").num_rows == 20
    users = pq.read_table(out / "interactions")["user_id"].to_numpy()
    assert users.min() >= 0 and users.max() < 5
    assert is_qarm_output(out) and sorted(p.name for p in out.iterdir()) == [".qarm-output.json", "interactions",
                                                                              "items"]
    assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]   # no staging leftovers


def test_synth_refuses_an_existing_out_and_replaces_only_an_earlier_qarm_output(tmp_path):
    out = tmp_path / "s"
    assert runner.invoke(app, SYNTH_TINY + ["--out", str(out), "--seed", "1"]).exit_code == 0
    first = pq.read_table(out / "interactions")
    again = runner.invoke(app, SYNTH_TINY + ["--out", str(out), "--seed", "2"])
    text = " ".join(again.output.split())
    assert again.exit_code == 2 and text.startswith("error: [stage=synth, dataset=out]"), again.output
    assert "pass --overwrite" in text and "Traceback" not in again.output
    assert pq.read_table(out / "interactions").equals(first)                  # untouched
    res = runner.invoke(app, SYNTH_TINY + ["--out", str(out), "--seed", "2", "--overwrite"])
    assert res.exit_code == 0, res.output
    second = pq.read_table(out / "interactions")
    assert second.num_rows == 200 and not second.equals(first)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_synth_never_deletes_a_folder_that_is_not_a_qarm_output(tmp_path):
    mine = tmp_path / "data"
    (mine / "items").mkdir(parents=True)              # looks like a log, but qarm did not write it
    (mine / "items" / "keep.parquet").write_bytes(b"years of work")
    (mine / "notes.txt").write_text("keep me")
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me too")
    for out, flags, why in ((mine, [], "is not a qarm output"), (mine, ["--overwrite"], "is not a qarm output"),
                            (a_file, ["--overwrite"], "is a file")):
        res = runner.invoke(app, SYNTH_TINY + ["--out", str(out), *flags])
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and "[stage=synth, dataset=out]" in text and why in text, res.output
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["items", "items/keep.parquet",
                                                                               "notes.txt"]
    assert (mine / "items" / "keep.parquet").read_bytes() == b"years of work"
    assert (mine / "notes.txt").read_text() == "keep me" and a_file.read_text() == "keep me too"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_stopped_synth_leaves_no_half_written_output(tmp_path):
    """SIGINT (Ctrl-C) while `qarm synth` writes: exit 130, --out absent, the staging folder removed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.support.paths import REPO

    out = tmp_path / "s"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-c", "from flows.cli import app; app()", "synth", "--out", str(out),
           "--users", "1000", "--items", "1000", "--interactions", "50000000"]      # ~10 s if not stopped
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while not list(tmp_path.glob(".s.tmp-*/out/interactions/part-*")) and proc.poll() is None \
                and time.monotonic() - t0 < 120:
            time.sleep(0.1)                               # half-way: items done, interactions being written
        assert proc.poll() is None, proc.stdout.read()
        os.kill(proc.pid, signal.SIGINT)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and "stopped by SIGINT" in " ".join(text.split()), text[-3000:]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_ingest_own_files_then_status_then_refresh_from_them(prefect_harness, tmp_path):
    """The workflow the ingest flow is for: `qarm ingest` your files (an inputs snapshot), then
    `qarm refresh --set ingest.source=published` runs the whole pipeline on them."""
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "s"), "--users", "20", "--items", "15",
                              "--interactions", "300"])
    assert res.exit_code == 0, res.output
    home = tmp_path / "home"
    res = runner.invoke(app, ["ingest", "--interactions", str(tmp_path / "s" / "interactions"),
                              "--items", str(tmp_path / "s" / "items"), "--config", TINY,
                              "--set", f"home={home}"])
    assert res.exit_code == 0, res.output
    assert "ingest.source=published" in res.output                     # what to run next
    cur = Storage(home).current()
    assert cur.manifest["datasets"]["interactions"]["rows"] == 300
    status = runner.invoke(app, ["status", "--config", TINY, "--set", f"home={home}"])
    assert status.exit_code == 0 and cur.snapshot_id in status.output and "300" in status.output
    assert "inputs only" in status.output
    res = runner.invoke(app, ["refresh", "--config", TINY, "--set", f"home={home}",
                              "--set", "ingest.source=published"])
    assert res.exit_code == 0, res.output
    full = Storage(home).current()
    assert full.manifest["meta"]["parent_snapshot"] == cur.snapshot_id
    for name in ("interactions", "items"):                          # the refresh ran on the published inputs
        assert read_dataset(full.record(name)).equals(read_dataset(cur.record(name)))
    assert {"periods", "codes", "codebook", "model"} <= set(full.manifest["datasets"])
    status = runner.invoke(app, ["status", "--config", TINY, "--set", f"home={home}"])
    assert status.exit_code == 0 and "inputs only" not in status.output
    # new data ingested after that refresh: the inputs snapshot carries the refresh's caches and models
    res = runner.invoke(app, ["ingest", "--interactions", str(tmp_path / "s" / "interactions"),
                              "--items", str(tmp_path / "s" / "items"), "--config", TINY, "--set", f"home={home}"])
    assert res.exit_code == 0, res.output
    carried = Storage(home).current().manifest["datasets"]
    for name in ("model", "two_tower", "codebook", "codes", "judgments", "qa"):
        assert carried[name]["fingerprint"] == full.manifest["datasets"][name]["fingerprint"], name


def test_bad_input_exits_2_with_clear_message(prefect_harness, tmp_path):
    (tmp_path / "i.csv").write_text("")
    (tmp_path / "t.csv").write_text("item_id,title\n1,x\n")
    res = runner.invoke(app, ["ingest", "--interactions", str(tmp_path / "i.csv"), "--items",
                              str(tmp_path / "t.csv"), "--config", TINY, "--set", f"home={tmp_path / 'h'}"])
    assert res.exit_code == 2
    assert "[stage=ingest, dataset=interactions] input file is empty" in " ".join(res.output.split())


def test_config_errors_exit_2(tmp_path):
    res = runner.invoke(app, ["config", "--config", TINY, "--set", "gates.items.min_rowz=3"])
    assert res.exit_code == 2 and "gates.items.min_rowz: unknown key" in res.output
    ok = runner.invoke(app, ["config", "--config", TINY, "--json"])
    assert ok.exit_code == 0 and '"source": "synth"' in ok.output
    missing = runner.invoke(app, ["ingest"])
    assert missing.exit_code != 0
    # every command reads its config under the same guard: one error line, exit 2, no traceback
    for cmd in (["runs", "compare"], ["rank", "compare"], ["status"]):
        bad = runner.invoke(app, [*cmd, "--config", TINY, "--set", "gates.items.min_rowz=3"])
        assert bad.exit_code == 2 and "gates.items.min_rowz: unknown key" in bad.output, (cmd, bad.output)


def test_a_tracking_password_from_the_environment_never_reaches_the_terminal(tmp_path):
    """MLFLOW_TRACKING_URI with user:password@: `qarm config` shows it redacted, and `qarm runs
    compare` against a server that is not there says so without the password MLflow's error quotes."""
    import socket

    with socket.socket() as s:                      # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MLFLOW_TRACKING_URI": f"http://alice:s3cr3t@127.0.0.1:{port}/base", "QARM_HOME": str(tmp_path / "h"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    shown = runner.invoke(app, ["config", "--config", TINY], env=env)
    assert shown.exit_code == 0 and f"tracking_uri: http://127.0.0.1:{port}/base" in shown.output, shown.output
    res = runner.invoke(app, ["runs", "compare", "--config", TINY], env=env)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and text.startswith("error:") and f"127.0.0.1:{port}/base" in text, res.output
    for out in (shown.output, res.output):
        assert "s3cr3t" not in out and "alice" not in out


def test_pairs_swing_cli(tmp_path):
    from qarm_core.pairs.config import SwingConfig
    from qarm_core.pairs.swing import mine_swing_pairs

    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "s"), "--users", "30", "--items", "20",
                              "--interactions", "600", "--seed", "3"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "pairs.parquet"
    res = runner.invoke(app, ["pairs", "swing", "--interactions", str(tmp_path / "s" / "interactions"),
                              "--out", str(out), "--top-k", "5", "--seed", "2", "--min-rating", "4"])
    assert res.exit_code == 0, res.output
    got = pq.read_table(out)
    inter = pq.read_table(tmp_path / "s" / "interactions")
    pos = inter.filter(pc.greater_equal(inter["rating"], 4.0))
    want = mine_swing_pairs(pos["user_id"].to_numpy(), pos["item_id"].to_numpy(), SwingConfig(top_k=5, seed=2))
    assert got.equals(want) and got.num_rows > 0
    bad = runner.invoke(app, ["pairs", "swing", "--interactions", str(tmp_path / "nope.csv"), "--out", str(out),
                              "--overwrite"])
    assert bad.exit_code == 2 and "input file not found" in bad.output
    assert np.all(pq.read_table(out)["src_item"].to_numpy() == got["src_item"].to_numpy())  # untouched


def test_quantize_cli_fit_warm_and_frozen(tmp_path):
    import json

    from qarm_core.quantize.io import embeddings_batch, synthetic_embeddings

    ids, x = next(synthetic_embeddings(3000, 16, clusters=50, seed=1))
    pq.write_table(pa.Table.from_batches([embeddings_batch(ids, x, "test")]), tmp_path / "emb.parquet")
    args = ["quantize", "--embeddings", str(tmp_path / "emb.parquet"), "--levels", "16,8", "--fsq-dims", "3"]
    res = runner.invoke(app, args + ["--out", str(tmp_path / "q1")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "q1" / "metrics.json").read_text())
    codes = pq.read_table(tmp_path / "q1" / "codes.parquet")
    assert codes.num_rows == 3000 and m["items"] == 3000 and "raw.collision_rate" in m
    res = runner.invoke(app, args + ["--out", str(tmp_path / "q2"), "--previous", str(tmp_path / "q1")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "q2" / "metrics.json").read_text())["churn"] == 0.0
    res = runner.invoke(app, args + ["--out", str(tmp_path / "q3"), "--previous", str(tmp_path / "q1"), "--frozen"])
    assert res.exit_code == 0 and pq.read_table(tmp_path / "q3" / "codes.parquet").equals(codes)
    bad = runner.invoke(app, ["quantize", "--embeddings", str(tmp_path / "emb.parquet"), "--levels", "4096,8",
                              "--out", str(tmp_path / "q4")])
    assert bad.exit_code == 2 and "fewer than K=4096" in bad.output and not (tmp_path / "q4").exists()


def test_bench_quantize_cli_tiny(tmp_path):
    import json

    res = runner.invoke(app, ["bench", "quantize", "--n", "2000", "--dim", "16", "--levels", "16,8",
                              "--no-floor", "--json", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output[res.output.index("{"):])
    assert r["rows"] == 2000 and r["seconds"] > 0 and r["peak_rss_gib"] > 0
    # 2,000 items in 16 x 8 k-means cells all collide; FSQ splits most apart; resolution leaves none
    assert r["resolved_collision"] == 0.0 < r["collision"] < r["rkmeans_collision"] == 1.0
    codes = pq.read_table(tmp_path / "b" / "codes.parquet")
    assert codes.num_rows == 2000
    raw = np.stack([codes[c].to_numpy() for c in ("c1", "c2", "c3_raw")], axis=1)
    _, inv, counts = np.unique(raw, axis=0, return_inverse=True, return_counts=True)
    assert r["collision"] == pytest.approx(float((counts[inv.ravel()] > 1).mean()))
    assert len(np.unique(np.stack([codes[c].to_numpy() for c in ("c1", "c2", "c3")], axis=1), axis=0)) == 2000
    table = runner.invoke(app, ["bench", "quantize", "--n", "500", "--dim", "8", "--levels", "8,4", "--no-floor"])
    assert table.exit_code == 0 and "collision" in table.output, table.output
    bad = runner.invoke(app, ["bench", "quantize", "--n", "10", "--levels", "16,8", "--no-floor"])
    assert bad.exit_code == 2 and "fewer than K=16" in bad.output


def test_out_is_refused_unless_it_is_an_earlier_qarm_output_and_overwrite_is_given(tmp_path):
    from qarm_core.quantize.io import embeddings_batch, synthetic_embeddings

    ids, x = next(synthetic_embeddings(600, 8, clusters=20, seed=1))
    pq.write_table(pa.Table.from_batches([embeddings_batch(ids, x, "test")]), tmp_path / "emb.parquet")
    args = ["quantize", "--embeddings", str(tmp_path / "emb.parquet"), "--levels", "8,4", "--fsq-dims", "2"]
    users = tmp_path / "users_folder"
    users.mkdir()
    (users / "thesis.txt").write_text("years of work")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for out, flags, why in ((users, [], "is not a qarm output"), (users, ["--overwrite"], "is not a qarm output"),
                            (a_file, ["--overwrite"], "is a file")):
        res = runner.invoke(app, args + ["--out", str(out), *flags])
        assert res.exit_code == 2 and why in " ".join(res.output.split()), res.output
    assert (users / "thesis.txt").read_text() == "years of work" and a_file.read_text() == "keep me"
    assert sorted(p.name for p in users.iterdir()) == ["thesis.txt"]
    out = tmp_path / "q"
    assert runner.invoke(app, args + ["--out", str(out)]).exit_code == 0
    first = (out / "codes.parquet").read_bytes()
    again = runner.invoke(app, args + ["--out", str(out)])
    assert again.exit_code == 2 and "pass --overwrite" in " ".join(again.output.split())
    res = runner.invoke(app, args + ["--out", str(out), "--seed", "5", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (out / "codes.parquet").read_bytes() != first and (out / "metrics.json").is_file()
    # pairs swing: one file, the same rules
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "s"), "--users", "30", "--items", "20",
                              "--interactions", "600", "--seed", "3"])
    swing = ["pairs", "swing", "--interactions", str(tmp_path / "s" / "interactions"), "--min-rating", "4"]
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1]}), foreign)
    res = runner.invoke(app, swing + ["--out", str(foreign), "--overwrite"])
    assert res.exit_code == 2 and "is not a qarm output" in " ".join(res.output.split())
    assert pq.read_table(foreign).num_rows == 1
    mine = tmp_path / "pairs.parquet"
    assert runner.invoke(app, swing + ["--out", str(mine)]).exit_code == 0
    assert runner.invoke(app, swing + ["--out", str(mine)]).exit_code == 2
    assert runner.invoke(app, swing + ["--out", str(mine), "--top-k", "2", "--overwrite"]).exit_code == 0
    assert pq.read_table(mine).num_rows > 0
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]      # no staging leftovers


def test_quantize_cli_refuses_zero_vectors_and_non_numeric_ids(tmp_path):
    from qarm_core.quantize.io import embeddings_batch, synthetic_embeddings

    ids, x = next(synthetic_embeddings(300, 8, clusters=10, seed=1))
    x = x.copy()
    x[7] = 0.0
    pq.write_table(pa.Table.from_batches([embeddings_batch(ids, x, "test")]), tmp_path / "zero.parquet")
    vec = pa.Table.from_batches([embeddings_batch(ids, x + 1, "test")])["vector"]
    pq.write_table(pa.table({"item_id": [f"sku-{i}" for i in ids], "vector": vec}), tmp_path / "str.parquet")
    for name, why in (("zero", "1 of 300 embeddings are all zeros"), ("str", "item_id has type string")):
        res = runner.invoke(app, ["quantize", "--embeddings", str(tmp_path / f"{name}.parquet"), "--levels", "8,4",
                                  "--out", str(tmp_path / name)])
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and "[stage=quantize, dataset=embeddings]" in text and why in text, res.output
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("rows, why", [
    ([(1, 10, 100, float("nan")), (2, 10, 101, 5.0)], "rating"),
    ([(1, 10, 100, float("inf")), (2, 10, 101, 5.0)], "rating"),
    ([(1, 10, 100, 7.0), (2, 10, 101, 5.0)], "rating"),
    ([(None, 10, 100, 4.0), (2, 10, 101, 5.0)], "user_id"),
])
def test_pairs_swing_runs_the_interactions_gate(tmp_path, rows, why):
    u, i, t, r = zip(*rows)
    pq.write_table(pa.table({"user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()),
                             "ts": pa.array(t, pa.int64()), "rating": pa.array(r, pa.float32())}),
                   tmp_path / "log.parquet")
    res = runner.invoke(app, ["pairs", "swing", "--interactions", str(tmp_path / "log.parquet"),
                              "--out", str(tmp_path / "p.parquet")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "[stage=pairs-swing, dataset=interactions]" in text and why in text, res.output
    assert not (tmp_path / "p.parquet").exists()


def test_pairs_swing_names_its_own_stage_and_refuses_an_empty_result(tmp_path):
    pq.write_table(pa.table({"user_id": pa.array([1, 1, 2, 2], pa.int64()), "item_id": pa.array([1, 2, 1, 2], pa.int64()),
                             "ts": pa.array([1, 2, 3, 4], pa.int64()), "rating": pa.array([5.0] * 4, pa.float32())}),
                   tmp_path / "log.parquet")
    base = ["pairs", "swing", "--interactions", str(tmp_path / "log.parquet"), "--out", str(tmp_path / "p.parquet")]
    for extra, why in ((["--min-rating", "10"], "[stage=pairs-swing, dataset=interactions] no events pass"),
                       (["--min-user-items", "5"], "[stage=pairs-swing, dataset=pairs] no pairs")):
        res = runner.invoke(app, base + extra)
        assert res.exit_code == 2 and why in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["pairs", "swing", "--interactions", str(tmp_path / "missing.csv"),
                              "--out", str(tmp_path / "p.parquet")])
    assert res.exit_code == 2 and "[stage=pairs-swing, dataset=interactions]" in " ".join(res.output.split())
    assert not (tmp_path / "p.parquet").exists()


def test_a_stop_that_prefect_turns_into_another_error_still_exits_130():
    """A SIGTERM landing while Prefect creates a task run makes Prefect's crash handler raise
    "Task run is not set" while handling the signal (seen in CI): the CLI still reports a clean stop,
    and the MLflow error names the signal. Errors without a stop in their chain are not stops."""
    import typer
    from prefect.exceptions import TerminationSignal

    from flows.cli import _guard
    from qarm_core.errors import DataError, stop_signal_name
    from tasks.tracking import describe_error

    def prefect_race():
        try:
            raise TerminationSignal(15)
        except TerminationSignal:
            raise ValueError("Task run is not set")

    with pytest.raises(ValueError) as info:
        prefect_race()
    assert stop_signal_name(info.value) == "SIGTERM"
    assert describe_error(info.value) == "stopped by SIGTERM: ValueError: Task run is not set"
    assert describe_error(TerminationSignal(1)).startswith("stopped by SIGHUP: TerminationSignal")
    try:                                                      # a long message is cut, the signal kept
        try:
            raise TerminationSignal(15)
        except TerminationSignal:
            raise RuntimeError("x" * 9000)
    except RuntimeError as exc:
        long = describe_error(exc, limit=100)
    assert len(long) == 100 and long.startswith("stopped by SIGTERM: RuntimeError: xxx")
    with pytest.raises(typer.Exit) as code:
        _guard(prefect_race)
    assert code.value.exit_code == 130

    assert stop_signal_name(ValueError("stopped by SIGTERM")) is None      # a message alone is not a stop
    assert describe_error(ValueError("x")) == "ValueError: x"
    with pytest.raises(ValueError):
        _guard(lambda: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(typer.Exit) as code:
        _guard(lambda: (_ for _ in ()).throw(DataError("ingest", "items", "bad")))
    assert code.value.exit_code == 2


def _children(pid: int) -> list[int]:
    """Pids of the running processes whose parent is ``pid`` (from /proc)."""
    from pathlib import Path

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()       # state, ppid, ...
            if fields[0] != "Z" and int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _prefect_flow_run_state(flow_run_id: str) -> str | None:
    """The state type Prefect's database holds for a flow run of a `qarm` subprocess started with this
    process's environment (read-only, from its SQLite file). The settings are built from the
    environment and profile, as the subprocess builds them, not taken from this process's settings
    context (the test harness's own database while a harness is active)."""
    import sqlite3

    from prefect.settings import Settings

    url = Settings().server.database.connection_url
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url)
    db = url.split(":///", 1)[1]
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
        row = con.execute("select state_type from flow_run where id = ?", (flow_run_id,)).fetchone()
    return row[0] if row else None


def _main_thread_innermost(out: str, frames: int = 16) -> str:
    """From a faulthandler dump of the CLI (``python -c``): the innermost frames of its main thread, the
    block whose outermost frame is the ``-c`` module."""
    import re

    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", out)
    main = [b for b in blocks if re.search(r'"<string>", line \d+ in <module>', b)]
    if not main:
        return ""
    return "\n--- the main thread, innermost frames ---\n" + "\n".join(main[-1].splitlines()[:frames + 1])


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM to the CLI", "Ctrl-C: SIGINT to its process group"])
def test_a_stop_ends_a_refresh_within_seconds_and_leaves_nothing_running(tmp_path, stop):
    """SIGTERM to `qarm refresh` mid-run, or a terminal's Ctrl-C (SIGINT to the whole foreground process
    group): exit 130 within seconds, no process left (the local Prefect API server included: it runs in a
    session of its own, so a Ctrl-C does not stop it before the refresh has recorded the stop), the
    MLflow runs FAILED with the signal named, the Prefect flow run no longer RUNNING, the lease
    released (so the next refresh can start: test_codebook_refresh covers a takeover)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from qarm_core.config import load_config
    from qarm_core.embed.train.launch import live_group_members
    from qarm_core.lease import LEASE_FILE
    from tasks import tracking
    from tests.support.paths import REPO

    sig = signal.SIGINT if stop.startswith("Ctrl-C") else signal.SIGTERM
    home = tmp_path / "home"
    env = {**os.environ, "QARM_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_API_URL": "",
           "QARM_STOP_GRACE_S": "25"}                      # a hung unwinding ends hard, its stacks printed
    cmd = [sys.executable, "-c", "from flows.cli import app; app()", "refresh", "--config", str(TINY)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    while not (home / "work" / "split").exists() and proc.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.2)                                   # mid-run: ingest done, the split stage started
    assert proc.poll() is None, proc.stdout.read()
    servers = [k for k in _children(proc.pid)
               if "flows.prefect_api" in Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="replace")]
    assert len(servers) == 1 and os.getsid(servers[0]) != os.getsid(proc.pid)    # its own session
    t_stop = time.monotonic()
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)                          # what the terminal does on Ctrl-C
    else:
        os.kill(proc.pid, sig)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:                     # stuck: its threads' stacks (faulthandler) for the report
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(3)
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"no exit 90 s after {stop}; its threads:\n{out[-12000:]}{_main_thread_innermost(out)}")
    # the unwinding hung and the watchdog ended it: the main thread's innermost frames last, where a
    # report that keeps only the tail of the output still shows them
    assert "ended hard" not in out, f"{out[-8000:]}{_main_thread_innermost(out)}"
    name = signal.Signals(sig).name
    assert proc.returncode == 130 and f"stopped by {name}" in " ".join(out.split()), out[-3000:]
    assert time.monotonic() - t_stop < 30
    deadline = time.monotonic() + 10
    while (live_group_members(proc.pid) or live_group_members(servers[0])) and time.monotonic() < deadline:
        time.sleep(0.2)                                   # the server leads its own session, so its own group
    assert live_group_members(proc.pid) == [] and live_group_members(servers[0]) == []
    assert not (home / LEASE_FILE).exists() and not (home / "CURRENT").exists()
    cfg = load_config(TINY, {"home": str(home)}).resolved()
    runs = tracking.runs_of(cfg)
    parents = [r for r in runs if r["tags"].get("qarm.flow") == "codebook-refresh"]
    assert parents and all(r["status"] == "FAILED" for r in parents)
    errors = [(r["name"], r["status"], r["tags"].get("qarm.error")) for r in runs]
    assert any(name in (e or "") for _, _, e in errors), errors
    flow_run_id = parents[0]["tags"].get("prefect.flow_run_id")
    assert flow_run_id
    assert _prefect_flow_run_state(flow_run_id) in ("CRASHED", "CANCELLED", "FAILED")


def test_a_killed_cli_takes_its_prefect_api_server_with_it(tmp_path):
    """SIGKILL gives the CLI no chance to stop the server it started: the server still exits (the
    kernel's parent-death signal), so no orphan keeps a port and the Prefect database open."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from qarm_core.embed.train.launch import live_group_members
    from tests.support.paths import REPO

    env = {**os.environ, "PREFECT_API_URL": "", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    code = ("import os, sys, time\nfrom flows.prefect_api import local_prefect_api\n"
            "with local_prefect_api() as url:\n    print(url, flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api"), url
        import httpx

        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        servers = _children(proc.pid)
        assert len(servers) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while live_group_members(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)                               # the server leads its own session, so its own group
        assert live_group_members(servers[0]) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigusr1_prints_the_stacks_of_a_running_command_and_sigterm_still_stops_it():
    """`kill -USR1 <pid>` shows what a command that seems stuck is doing (every thread's stack, on
    stderr), and does not end it; a SIGTERM after it still stops it with exit 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.support.paths import REPO

    code = ("import time\nfrom flows.cli import _guard\n"
            "def waiting_for_work():\n    print('ready', flush=True)\n    time.sleep(120)\n"
            "try:\n    _guard(waiting_for_work)\nexcept Exception as exc:          # typer.Exit outside typer\n"
            "    raise SystemExit(getattr(exc, 'exit_code', 1))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(1.0)
        assert proc.poll() is None                        # still running
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "waiting_for_work" in err and "Current thread" in err, err[-3000:]


def test_the_prefect_api_url_is_used_as_given_or_set_for_the_block_only():
    """With PREFECT_API_URL set nothing is started; without it the started server's URL is the API of
    the block (and of the processes it starts), and unset again after it. In a subprocess: the settings
    are process-global."""
    import os
    import subprocess
    import sys

    from tests.support.paths import REPO

    code = ("import os, subprocess, httpx\nfrom flows.prefect_api import local_prefect_api, configured_api_url\n"
            "with local_prefect_api() as url:\n"
            "    kids = subprocess.run(['pgrep', '-P', str(os.getpid())], capture_output=True, text=True).stdout.split()\n"
            "    ok = httpx.get(f'{url}/health', timeout=10).status_code == 200 if url.endswith('/api') and "
            "':1/' not in url else None\n"
            "    print(url, configured_api_url() == url == os.environ['PREFECT_API_URL'], len(kids), ok)\n"
            "print(configured_api_url(), os.environ.get('PREFECT_API_URL'))\n")
    base = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    given = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**base, "PREFECT_API_URL": "http://127.0.0.1:1/api"})
    assert given.stdout.split("\n")[:2] == ["http://127.0.0.1:1/api True 0 None",
                                            "http://127.0.0.1:1/api http://127.0.0.1:1/api"], given.stderr[-2000:]
    own = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**base, "PREFECT_API_URL": ""})
    inside, after = own.stdout.split("\n")[:2]
    url, same, kids, healthy = inside.split()
    assert url.startswith("http://127.0.0.1:") and (same, kids, healthy) == ("True", "1", "True"), own.stderr[-2000:]
    assert after == "None None"


# ---------------------------------------------------------------- qarm ingest: the ingest flow only; errors in one line

@pytest.fixture(scope="module")
def ingested(prefect_harness, tmp_path_factory):
    """A home where `qarm ingest` published a small synthetic log once: (home, the synth folder)."""
    d = tmp_path_factory.mktemp("ingested")
    res = runner.invoke(app, ["synth", "--out", str(d / "s"), "--users", "20", "--items", "15",
                              "--interactions", "300", "--seed", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ingest", "--interactions", str(d / "s" / "interactions"), "--items",
                              str(d / "s" / "items"), "--config", TINY, "--set", f"home={d / 'home'}"])
    assert res.exit_code == 0, res.output
    return d / "home", d / "s"


def test_ingest_publishes_the_inputs_and_runs_no_other_stage(ingested):
    from qarm_core.config import load_config
    from tasks import tracking

    home, _ = ingested
    cur = Storage(home).current()
    assert sorted(cur.manifest["datasets"]) == ["interactions", "items"]       # nothing to carry over yet
    assert sorted(p.name for p in (home / "work").iterdir()) == ["ingest"]
    runs = tracking.runs_of(load_config(TINY, {"home": str(home)}).resolved())
    parent = [r for r in runs if r["tags"].get("qarm.flow") == "ingest"]
    assert len(parent) == 1 and parent[0]["status"] == "FINISHED"
    assert cur.manifest["meta"]["mlflow_run_id"] == parent[0]["run_id"]
    assert sorted(r["name"] for r in runs if r["tags"].get("mlflow.parentRunId") == parent[0]["run_id"]) == \
        ["gate-ingest-interactions", "gate-ingest-items", "ingest", "publish"]
    assert not [r for r in runs if r["tags"].get("qarm.flow") not in (None, "ingest")]      # no refresh ran
    assert len(list((home / "logs").glob("ingest-*.log"))) == 1


def test_an_inputs_snapshot_is_refused_by_evaluate_with_the_missing_dataset(ingested, terminal):
    home, _ = ingested
    res = runner.invoke(app, ["evaluate", "--no-rank", "--config", TINY, "--set", f"home={home}"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "error: [stage=evaluate, dataset=periods]" in text, res.output
    assert "Traceback" not in terminal.getvalue() + res.output


@pytest.fixture
def terminal():
    """What the terminal shows of the log records: Prefect's console handler, pointed at a buffer for
    the test (CliRunner does not capture it: it writes to the stream that was stderr at its setup)."""
    import io
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    buf = io.StringIO()
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert consoles
    saved = [(h, h.stream, h.console.file) for h in consoles]
    for h in consoles:
        h.stream = h.console.file = buf
    yield buf
    for h, stream, file in saved:
        h.stream, h.console.file = stream, file


def _bad_ingest(home, tmp_path, *debug):
    (tmp_path / "i.csv").write_text("")
    (tmp_path / "t.csv").write_text("item_id,title\n1,x\n")
    return runner.invoke(app, [*debug, "ingest", "--interactions", str(tmp_path / "i.csv"), "--items",
                               str(tmp_path / "t.csv"), "--config", TINY, "--set", f"home={home}"])


def test_an_ingest_error_is_one_line_and_its_traceback_goes_to_the_log_file(ingested, tmp_path, terminal):
    import re
    from pathlib import Path

    home, _ = ingested
    pointer = (home / "CURRENT").read_bytes()
    res = _bad_ingest(home, tmp_path)
    shown = terminal.getvalue() + res.output
    assert res.exit_code == 2 and (res.exception is None or isinstance(res.exception, SystemExit)), res.output
    assert "Beginning flow run" in shown                                      # the progress lines stay
    assert "Traceback" not in shown, shown
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "[stage=ingest, dataset=interactions] input file is empty" in errors[0]
    log = Path(re.search(r"\(full log: (\S+\.log)\)", errors[0]).group(1))
    assert log.parent == home / "logs" and log.name.startswith("ingest-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "input file is empty" in text
    assert "Beginning flow run" in text
    assert (home / "CURRENT").read_bytes() == pointer


def test_debug_shows_the_traceback_on_the_terminal(ingested, tmp_path, terminal):
    home, _ = ingested
    res = _bad_ingest(home, tmp_path, "--debug")
    shown = terminal.getvalue() + res.output
    assert res.exit_code == 2 and "Traceback (most recent call last)" in shown
    assert "error: [stage=ingest, dataset=interactions] input file is empty" in " ".join(res.output.split())


def test_an_unknown_set_key_is_blamed_on_set_with_the_nearest_key(tmp_path):
    res = runner.invoke(app, ["ingest", "ml100k", "--config", TINY, "--set", "ingest.synth.userz=3"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"error: [stage=config, dataset={TINY}] --set ingest.synth.userz: unknown key; " \
           "did you mean ingest.synth.users?" in text
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"extends: {TINY}\ningest:\n  synth:\n    userz: 3\n")
    res = runner.invoke(app, ["config", "--config", str(cfg)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and f"ingest.synth.userz: unknown key in {cfg}; did you mean ingest.synth.users?" in text


def test_a_stop_that_duckdb_turns_into_query_interrupted_is_still_a_stop():
    """DuckDB turns a signal that lands during a query into RuntimeError("Query interrupted"), with no
    link to it: the command still ends as a stop (exit 130), and the task retry rule does not rerun
    the stage it failed (which let a SIGINT'd refresh carry on and exit 0)."""
    import os
    import signal
    import threading

    import duckdb
    import typer

    from flows.cli import _guard
    from qarm_core.errors import forget_stops, stop_requested
    from tasks.common import retry_unless_bad_input

    class Failed:
        def result(self):
            raise RuntimeError("Query interrupted")

    seen = []

    def long_query():
        try:
            duckdb.sql("select sum(a * b) from range(3000000000) t(a), (select 1 b)").fetchall()
        except BaseException as exc:
            seen.append(exc)
            raise

    assert retry_unless_bad_input(None, None, Failed()) is True          # no stop yet: a transient error
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    try:
        with pytest.raises(typer.Exit) as ei:
            _guard(long_query)
        assert ei.value.exit_code == 130 and stop_requested() == "SIGTERM"
        assert retry_unless_bad_input(None, None, Failed()) is False
    finally:
        forget_stops()
    assert seen and stop_requested() is None


def test_pool_with_is_refused_before_prefect_starts(tmp_path):
    """``--pool-with`` names a file that is not a comparison's scores, or comes without the ranking
    section: one error line, exit 2, before a flow (or Prefect's API server) starts."""
    from flows.rank_cli import app as rank_app

    missing = tmp_path / "missing.npz"
    home = tmp_path / "home"
    for command, args, stage in ((app, ["evaluate", "--pool-with", str(missing)], "evaluate"),
                                 (app, ["evaluate", "--no-rank", "--pool-with", str(missing)], "evaluate"),
                                 (rank_app, ["compare", "-m", "din", "--pool-with", str(missing)], "rank")):
        res = runner.invoke(command, [*args, "--config", TINY, "--set", f"home={home}"])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
        dataset = "pool_with" if "--no-rank" in args else str(missing)
        assert f"error: [stage={stage}, dataset={dataset}] --pool-with" in res.output
    assert not home.exists()                                # nothing ran, nothing was written


def test_a_sigterm_that_prefects_handler_loses_still_stops_the_command():
    """While a flow runs, Prefect's engine owns SIGTERM (``capture_sigterm``) and raises its
    TerminationSignal where the signal lands; in a ``__del__`` or a weakref callback that exception
    is only printed (seen in a SIGTERM'd refresh, which ran on and published). The command still
    records the stop: the next progress tick raises it, and the command exits 130."""
    import os
    import signal
    import sys

    import typer
    from prefect.utilities.engine import capture_sigterm

    from flows.cli import _guard
    from qarm_core.errors import forget_stops, stop_requested
    from qarm_core.progress import Progress

    class Collected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)      # Prefect's handler runs here: its exception is lost

    went_on, lost = [], []

    def stage():
        with capture_sigterm():                       # what the flow engine does around a flow run
            assert signal.getsignal(signal.SIGTERM).__module__ == "prefect.utilities.engine"
            Collected()
            went_on.append("past the signal")
            with Progress("test", "units", 3, emit=lambda line: None) as prog:
                for _ in range(3):
                    prog.advance()
                    went_on.append("a unit")

    hook, sys.unraisablehook = sys.unraisablehook, lambda u: lost.append(u.exc_type.__name__)
    try:
        with pytest.raises(typer.Exit) as ei:
            _guard(stage)
        assert ei.value.exit_code == 130 and stop_requested() == "SIGTERM"
    finally:
        sys.unraisablehook = hook
        forget_stops()
    assert lost == ["TerminationSignal"] and went_on == ["past the signal"]


HUNG_AFTER_A_STOP = """
import os, signal, threading
import typer
from flows.cli import _guard

def stage_that_hangs_after_the_signal():
    signal.signal(signal.SIGTERM, lambda signum, frame: None)   # a library's handler: raises nothing
    os.kill(os.getpid(), signal.SIGTERM)
    held = threading.Lock()
    held.acquire()
    held.acquire()                                              # a lock nobody will release

try:
    _guard(stage_that_hangs_after_the_signal)
except typer.Exit as exc:                                       # what the typer app does with it
    raise SystemExit(exc.exit_code)
"""


@pytest.mark.parametrize("grace", ["1", "bad", "inf"])
def test_a_command_that_hangs_after_a_stop_is_ended_hard_after_the_grace(grace):
    """A stop whose unwinding hangs (a library left waiting on a lock) does not hang the command: after
    QARM_STOP_GRACE_S seconds it writes its threads' stacks and exits 130. A grace that is not a
    number, or not a finite one, is refused before anything runs (exit 2, the variable named)."""
    import os
    import subprocess
    import sys
    import time

    from tests.support.paths import REPO

    env = {**os.environ, "QARM_STOP_GRACE_S": grace}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", HUNG_AFTER_A_STOP], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    took = time.monotonic() - t0
    if grace != "1":
        assert proc.returncode == 2 and f"QARM_STOP_GRACE_S={grace!r}" in proc.stdout + proc.stderr
        return
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "stopped by SIGTERM: the run did not end within 1 s" in proc.stderr
    assert "stage_that_hangs_after_the_signal" in _main_thread_innermost(proc.stderr)  # the hung main thread
    assert took < 60


def test_a_stop_inside_a_library_waits_for_the_next_check_and_prefects_sigterm_handler_is_replaced():
    """The command's handler raises a stop at once in our code, but only records it inside a library
    that may hold a transaction or a lock (a SIGINT'd refresh hung in SQLite's commit while ending its
    MLflow run): the library's work completes and the next progress tick raises it. In a flow run the
    command's handler replaces Prefect's SIGTERM bridge (``reclaim_stop_signals``), and is what Prefect
    puts back when the run ends."""
    import os
    import signal

    import typer
    from prefect.utilities.engine import capture_sigterm

    from flows.cli import _guard
    from qarm_core.errors import forget_stops, reclaim_stop_signals, stop_requested
    from qarm_core.progress import Progress

    scope = {"__name__": "sqlalchemy.engine.fake"}
    exec("import os, signal\n"
         "def commit(done):\n"
         "    os.kill(os.getpid(), signal.SIGTERM)\n"
         "    done.append('commit finished')\n", scope)
    done: list[str] = []
    handlers = []

    def stage():
        command_handler = signal.getsignal(signal.SIGTERM)
        with capture_sigterm():                               # the flow engine, around a flow run
            assert signal.getsignal(signal.SIGTERM) is not command_handler
            assert reclaim_stop_signals() is True
            handlers.append(signal.getsignal(signal.SIGTERM) is command_handler)
            scope["commit"](done)                             # the signal lands inside the library
            done.append("after the library call")
            with Progress("test", "units", 3, emit=lambda line: None) as prog:
                prog.advance()
                done.append("after a tick")

    assert reclaim_stop_signals() is False                    # no command: nothing to put back
    try:
        with pytest.raises(typer.Exit) as ei:
            _guard(stage)
        assert ei.value.exit_code == 130 and stop_requested() == "SIGTERM"
    finally:
        forget_stops()
    assert handlers == [True] and done == ["commit finished", "after the library call"]

    done.clear()

    def ours():
        os.kill(os.getpid(), signal.SIGTERM)                  # in our code: raised at once
        done.append("not reached")

    try:
        with pytest.raises(typer.Exit) as ei:
            _guard(ours)
        assert ei.value.exit_code == 130
    finally:
        forget_stops()
    assert done == []


def test_a_rank_command_is_stopped_by_the_commands_handler(tmp_path, monkeypatch):
    """`qarm rank compare` runs under the command's stop handler as the other flow commands do: a
    SIGTERM during its flow run ends it with exit 130 and the "stopped by" line, not the process."""
    import os
    import signal

    import flows.rank_cli
    import flows.rank_train
    from qarm_core.errors import forget_stops

    went_on = []

    def rank_train(**kwargs):
        os.kill(os.getpid(), signal.SIGTERM)        # lands in our code: raised at once
        went_on.append("past the signal")
        return {}

    monkeypatch.setattr(flows.rank_train, "rank_train", rank_train)
    monkeypatch.setattr(flows.rank_cli, "local_prefect_api", contextlib.nullcontext)
    try:
        res = CliRunner().invoke(flows.rank_cli.app, ["compare", "-m", "din", "--config", TINY,
                                                      "--set", f"home={tmp_path / 'home'}"])
    finally:
        forget_stops()
    assert res.exit_code == 130, res.output
    assert "stopped by SIGTERM" in res.output and went_on == []
