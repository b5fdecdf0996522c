import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from qarm_core.errors import StorageError
from qarm_core.schemas import ITEMS
from qarm_core.storage import (Storage, read_dataset, write_parquet_dataset, write_stage_outputs)
from tests.support.paths import REPO


def _items(n: int, start: int = 0) -> pa.Table:
    return pa.table({"item_id": pa.array(range(start, start + n), pa.int64()),
                     "title": [f"t{i}" for i in range(start, start + n)],
                     "year": pa.array([2000] * n, pa.int32()),
                     "tags": pa.array([["a"]] * n, pa.list_(pa.string())),
                     "description": pa.array([None] * n, pa.string())}, schema=ITEMS.schema)


def _stage(storage: Storage, key: str, table: pa.Table):
    records, reused, _ = write_stage_outputs(storage, "ingest", key,
                                             {"items": (ITEMS, lambda: iter(table.to_batches()))})
    return records, reused


def test_write_and_read_roundtrip(tmp_path):
    t = _items(25)
    rec = write_parquet_dataset(tmp_path / "items", iter(t.to_batches(max_chunksize=7)), ITEMS, rows_per_file=10)
    assert rec.rows == 25 and rec.files == ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet")
    assert read_dataset(rec).equals(t)
    again = write_parquet_dataset(tmp_path / "items2", iter(t.to_batches(max_chunksize=7)), ITEMS, rows_per_file=10)
    assert again.fingerprint == rec.fingerprint  # same bytes, same fingerprint
    other = write_parquet_dataset(tmp_path / "items3", iter(_items(25, start=1).to_batches()), ITEMS)
    assert other.fingerprint != rec.fingerprint


def test_write_rejects_wrong_schema(tmp_path):
    bad = pa.table({"item_id": pa.array([1], pa.int32()), "title": ["x"]})
    with pytest.raises(StorageError, match="does not match the declared schema"):
        write_parquet_dataset(tmp_path / "items", iter(bad.to_batches()), ITEMS)


def test_publish_moves_current_and_keeps_old(tmp_path):
    st = Storage(tmp_path).ensure()
    assert st.current() is None
    r1, reused = _stage(st, "k1", _items(3))
    assert not reused
    s1 = st.publish(r1)
    assert st.current().snapshot_id == s1.snapshot_id
    r2, _ = _stage(st, "k2", _items(5))
    s2 = st.publish(r2)
    assert st.current().snapshot_id == s2.snapshot_id
    assert st.list_snapshots() == sorted([s1.snapshot_id, s2.snapshot_id])
    assert read_dataset(st.snapshot(s1.snapshot_id).record("items")).num_rows == 3
    assert read_dataset(st.current().record("items")).num_rows == 5
    # a run that started from s1 (or from nothing) must not replace s2, which it never saw
    r3, _ = _stage(st, "k3", _items(7))
    for started_from in (s1.snapshot_id, None):
        with pytest.raises(StorageError, match="CURRENT moved .* nothing is published"):
            st.publish(r3, expect_parent=started_from)
    assert st.current().snapshot_id == s2.snapshot_id and len(st.list_snapshots()) == 2
    assert st.publish(r3, expect_parent=s2.snapshot_id).snapshot_id == st.current().snapshot_id


def test_staged_output_is_reused_and_invalidated_when_files_vanish(tmp_path):
    st = Storage(tmp_path).ensure()
    r1, reused1 = _stage(st, "k", _items(3))
    r2, reused2 = _stage(st, "k", _items(99))  # same key: the batches are not even produced
    assert (reused1, reused2) == (False, True) and r2 == r1
    os.remove(Path(r1["items"].path) / r1["items"].files[0])
    r3, reused3 = _stage(st, "k", _items(4))
    assert not reused3 and r3["items"].rows == 4


def test_stage_report_is_stored_and_returned_on_reuse(tmp_path):
    st = Storage(tmp_path).ensure()

    def produce(report):
        def gen():
            report["rows_seen"] = 3
            yield _items(3).to_batches()[0]
        return gen
    first: dict = {}
    _, reused, rep = write_stage_outputs(st, "mine", "k", {"items": (ITEMS, produce(first))}, first)
    assert not reused and rep == {"rows_seen": 3}
    _, reused, rep2 = write_stage_outputs(st, "mine", "k", {"items": (ITEMS, produce({}))})
    assert reused and rep2 == {"rows_seen": 3}


def test_failure_while_writing_stage_leaves_nothing(tmp_path):
    st = Storage(tmp_path).ensure()

    def broken():
        yield _items(2).to_batches()[0]
        raise OSError("disk went away")
    with pytest.raises(OSError):
        write_stage_outputs(st, "ingest", "k", {"items": (ITEMS, broken)})
    assert st.staged_records("ingest", "k") is None
    assert list((st.work_dir / "ingest").iterdir()) == []


def test_failure_between_write_and_publish_keeps_current(tmp_path, monkeypatch):
    st = Storage(tmp_path).ensure()
    good = st.publish(_stage(st, "k1", _items(3))[0])
    pointer_before = st.current_file.read_bytes()

    def crash(self, sid):
        raise OSError("crash before the pointer moved")
    monkeypatch.setattr(Storage, "_set_current", crash)
    with pytest.raises(OSError):
        st.publish(_stage(st, "k2", _items(5))[0])
    assert st.current_file.read_bytes() == pointer_before
    assert st.current().snapshot_id == good.snapshot_id
    assert read_dataset(st.current().record("items")).num_rows == 3


def test_hard_crash_during_publish_keeps_current(tmp_path):
    """A process killed (os._exit) while replacing CURRENT: the old pointer and snapshot survive."""
    st = Storage(tmp_path).ensure()
    good = st.publish(_stage(st, "k1", _items(3))[0])
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        import pyarrow as pa
        from qarm_core import storage as s
        from tests.unit.test_storage import _items, _stage
        st = s.Storage({str(tmp_path)!r})
        recs = _stage(st, "k2", _items(5))[0]
        real_replace = os.replace
        def dying_replace(src, dst):
            if str(dst).endswith("CURRENT"):
                os._exit(9)   # killed after the new pointer's temp file is written, before the rename
            return real_replace(src, dst)
        s.os.replace = dying_replace
        st.publish(recs)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO)
    assert proc.returncode == 9
    cur = Storage(tmp_path).current()
    assert cur.snapshot_id == good.snapshot_id
    assert read_dataset(cur.record("items")).num_rows == 3
    # the next publish works and cleans up
    assert list(tmp_path.glob(".CURRENT.*.tmp"))  # the dead process's pointer draft
    st.publish(_stage(st, "k3", _items(7))[0], retention=5)
    assert read_dataset(st.current().record("items")).num_rows == 7
    assert not list(tmp_path.glob(".CURRENT.*.tmp"))


def test_retention_never_removes_current(tmp_path):
    st = Storage(tmp_path).ensure()
    ids = [st.publish(_stage(st, f"k{i}", _items(i + 1))[0], retention=2).snapshot_id for i in range(4)]
    assert st.list_snapshots() == ids[-2:]
    # point CURRENT back at an older snapshot (a manual rollback), then prune hard
    st._set_current(ids[2])
    assert st.prune(1) == [ids[3]]
    assert st.list_snapshots() == [ids[2]]


def test_missing_dataset_and_snapshot_errors(tmp_path):
    st = Storage(tmp_path).ensure()
    snap = st.publish(_stage(st, "k", _items(1))[0])
    with pytest.raises(StorageError, match="has no dataset 'pairs'"):
        snap.record("pairs")
    with pytest.raises(StorageError, match="not found"):
        st.snapshot("nope")
    st.current_file.write_text("{not json")
    with pytest.raises(StorageError, match="unreadable"):
        st.current()


def test_publish_refuses_missing_files(tmp_path):
    st = Storage(tmp_path).ensure()
    recs = _stage(st, "k", _items(2))[0]
    os.remove(Path(recs["items"].path) / recs["items"].files[0])
    with pytest.raises(StorageError, match="is missing"):
        st.publish(recs)
    assert st.current() is None and st.list_snapshots() == []


def test_schema_version_mismatch_is_refused(tmp_path):
    st = Storage(tmp_path).ensure()
    rec = _stage(st, "k", _items(2))[0]["items"]
    from dataclasses import replace
    with pytest.raises(StorageError, match="schema version 99"):
        read_dataset(replace(rec, schema_version=99))


def test_manifest_records_rows_and_meta(tmp_path):
    st = Storage(tmp_path).ensure()
    snap = st.publish(_stage(st, "k", _items(4))[0], meta={"mlflow_run_id": "abc"})
    mf = json.loads((Path(snap.path) / "manifest.json").read_text())
    assert mf["datasets"]["items"]["rows"] == 4 and mf["meta"]["mlflow_run_id"] == "abc"


def test_publish_with_same_key_is_idempotent(tmp_path):
    st = Storage(tmp_path).ensure()
    recs = _stage(st, "k", _items(3))[0]
    a = st.publish(recs, publish_key="run-1")
    b = st.publish(recs, publish_key="run-1")       # a retried publish task
    c = st.publish(recs, publish_key="run-2")       # a new flow run publishes anew
    assert a.snapshot_id == b.snapshot_id != c.snapshot_id
    assert len(st.list_snapshots()) == 2


def test_concurrent_publishers_with_tight_retention_never_lose_current(tmp_path):
    """Publish + prune from several threads (retention 1): CURRENT always names a live snapshot."""
    import threading

    st = Storage(tmp_path).ensure()
    recs = [_stage(st, f"k{i}", _items(i + 1))[0] for i in range(4)]
    errors = []

    def worker(r):
        try:
            for _ in range(8):
                Storage(tmp_path).publish(r, retention=1)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(r,)) for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    cur = st.current()
    assert read_dataset(cur.record("items")).num_rows in {1, 2, 3, 4}
    assert cur.snapshot_id in st.list_snapshots()


def test_artifacts_are_staged_reused_and_published(tmp_path):
    """A model or codebook folder (nested, non-tabular files) travels like a dataset."""
    from qarm_core.storage import write_stage_outputs

    st = Storage(tmp_path / "home").ensure()
    calls = []

    def write(folder):
        calls.append(folder)
        (folder / "sub").mkdir()
        (folder / "config.json").write_text('{"k": 1}')
        (folder / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 10)

    recs, reused, _ = write_stage_outputs(st, "train", "k1", {}, artifacts={"model": (3, write)})
    assert not reused and recs["model"].files == ("config.json", "sub/weights.bin")
    assert recs["model"].schema_version == 3 and recs["model"].rows == 2
    again, reused2, _ = write_stage_outputs(st, "train", "k1", {}, artifacts={"model": (3, write)})
    assert reused2 and again == recs and len(calls) == 1
    snap = st.publish(recs)
    assert (Path(snap.path) / "model" / "sub" / "weights.bin").read_bytes() == b"\x00\x01" * 10
    assert st.published("model").fingerprint == recs["model"].fingerprint
    assert st.published("codebook") is None


def test_a_dataset_of_an_older_schema_is_no_cache(tmp_path):
    """After an upgrade that bumps a schema version, the published table of the old version is not
    offered as a cache (the stage recomputes) but stays readable as a record."""
    from dataclasses import replace

    st = Storage(tmp_path).ensure()
    recs, _ = _stage(st, "k1", _items(3))
    st.publish({"items": replace(recs["items"], schema_version=ITEMS.version - 1)})
    assert st.published("items").schema_version == ITEMS.version - 1
    assert st.published_cache("items") is None
    st.publish(_stage(st, "k2", _items(4))[0])
    assert st.published_cache("items").rows == 4


def test_a_failed_cli_write_leaves_the_earlier_output_and_no_leftovers(tmp_path):
    from qarm_core.errors import DataError
    from qarm_core.storage import OUTPUT_MARK, staged_output

    out = tmp_path / "q"
    with staged_output(out, "folder", False, "quantize") as d:
        (d / "codes.txt").write_text("first")
    assert (out / "codes.txt").read_text() == "first" and (out / OUTPUT_MARK).is_file()
    with pytest.raises(RuntimeError, match="killed"):
        with staged_output(out, "folder", True, "quantize") as d:
            (d / "codes.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (out / "codes.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    # a path that appears while the command works is not clobbered
    late = tmp_path / "late"
    with pytest.raises(DataError, match="not a qarm output"):
        with staged_output(late, "folder", True, "quantize") as d:
            late.mkdir()
            (late / "mine.txt").write_text("user data")
    assert (late / "mine.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "q"]


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    from qarm_core.storage import _owner_tag

    st = Storage(tmp_path).ensure()
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout)
    host = _owner_tag().rsplit("_", 1)[0]
    (st.work_dir / "judge").mkdir(parents=True)
    made = {"dead_stage": st.work_dir / "judge" / f".tmp-abc123-{host}_{dead_pid}-0123abcd",
            "live_stage": st.work_dir / "judge" / f".tmp-abc123-{_owner_tag()}-0123abce",
            "dead_snapshot": st.staging_dir / f"20261203T000000Z-aaaaaa.{host}_{dead_pid}.a1b2c3",
            "other_host": st.staging_dir / f"20261203T000000Z-aaaaaa.elsewhere_{dead_pid}.a1b2c4",
            "old_format": st.work_dir / "judge" / ".tmp-abc123-0123abcf"}
    for p in made.values():
        p.mkdir(parents=True)
    removed = st.remove_dead_leftovers()
    assert removed == sorted([made["dead_stage"].name, made["dead_snapshot"].name])
    assert {k for k, p in made.items() if p.exists()} == {"live_stage", "other_host", "old_format"}
