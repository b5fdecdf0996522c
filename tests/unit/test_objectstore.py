"""An object-store home (``qarm_core.objectstore``) against a real S3 API: moto's server on 127.0.0.1,
spoken to over HTTP. Publishing (races, killed publishers, fetch, prune) and the lease object."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest

from qarm_core.errors import StorageError
from qarm_core.lease import BusyError, LeaseLost
from qarm_core.objectstore import CURRENT, LEASE, MANIFEST, ObjectHome, ObjectLease, PublishConflict
from qarm_core.storage import hash_files, new_snapshot_id
from tests.support.s3 import S3Server, moto_s3_server, use_s3_server

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    with moto_s3_server() as server:
        yield server


@pytest.fixture
def home_url(s3_server, monkeypatch, tmp_path_factory) -> str:
    return use_s3_server(monkeypatch, s3_server, tmp_path_factory)


@pytest.fixture
def home(home_url) -> ObjectHome:
    return ObjectHome(home_url)


@pytest.fixture(scope="module")
def botocore_session() -> Any:
    from aiobotocore.session import get_session

    return get_session()


@pytest.fixture
def separate_home(home_url, botocore_session):
    """Homes with clients of their own, as separate publisher processes would have (one shared
    botocore session only spares loading the S3 API model for each)."""
    def make() -> ObjectHome:
        return ObjectHome(home_url, storage_options={"skip_instance_cache": True, "session": botocore_session})
    return make


def sid(n: int) -> str:
    """Snapshot ids as qarm makes them, ordered by ``n``."""
    return new_snapshot_id(T0 + timedelta(minutes=n))


def local_snapshot(root: Path, snapshot_id: str, seed: int) -> Path:
    """A complete local snapshot folder as ``Storage`` builds one: datasets of part files, an artifact
    with a subfolder and an empty file, and a manifest with real fingerprints. Seeded bytes."""
    rng = random.Random(seed)
    folder = root / snapshot_id
    layout = {"items": ["part-00000.parquet", "part-00001.parquet"],
              "codebook": ["meta.json", "model/EMPTY", "model/weights.bin"]}
    datasets = {}
    for name, files in layout.items():
        for f in files:
            p = folder / name / f
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"" if f.endswith("EMPTY") else rng.randbytes(rng.randint(1, 3000)))
        datasets[name] = {"rows": len(files), "schema_version": 1, "files": files,
                          "fingerprint": hash_files(folder / name / f for f in files)}
    manifest = {"snapshot_id": snapshot_id, "created_at": T0.isoformat(), "qarm_version": "0.1.0",
                "datasets": datasets, "meta": {"seed": seed}, "publish_key": None}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def keys_under(home: ObjectHome, rel: str) -> list[str]:
    base = home.path(rel) + "/"
    return sorted(p[len(base):] for p in home.fs.find(base))


# ---------------------------------------------------------------- the home


def _all_at_once(run, n: int) -> None:
    """``run(0) .. run(n - 1)`` on n threads started together; waits for all (30 s each at most)."""
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def test_importing_the_module_loads_no_s3_client_and_no_orchestration():
    code = ("import sys, qarm_core.objectstore; "
            "print(sorted(m for m in ('s3fs', 'botocore', 'aiobotocore', 'fsspec', 'prefect', 'mlflow') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_home_url_must_name_a_bucket(s3_server, home_url):
    for bad in ("/tmp/home", "s3://", "s3://Upper/x", "s3://ok-bucket/a/../b", "gs://bucket/x"):
        with pytest.raises(StorageError, match=r"\[stage=home, dataset=CURRENT\]"):
            ObjectHome(bad, endpoint_url=s3_server.endpoint)
    h = ObjectHome("s3://qarm-test//a/b/", endpoint_url=s3_server.endpoint)
    assert (h.bucket, h.prefix, h.url, h.key(CURRENT)) == ("qarm-test", "a/b", "s3://qarm-test/a/b", "a/b/CURRENT")
    assert ObjectHome("s3://qarm-test/c", endpoint_url=s3_server.endpoint).fs is h.fs     # one client, made once
    with pytest.raises(StorageError, match=r"\[stage=home, dataset=CURRENT\] bucket no-such-bucket does not exist"):
        ObjectHome("s3://no-such-bucket/x", endpoint_url=s3_server.endpoint).current()


def test_publish_then_read_fetch_byte_identical_and_cached(home, s3_server, tmp_path, monkeypatch):
    assert home.endpoint_url == s3_server.endpoint          # from AWS_ENDPOINT_URL_S3
    assert home.current() is None and home.list_snapshots() == []
    s1 = sid(1)
    local = local_snapshot(tmp_path / "local", s1, seed=1)
    uploaded: list[str] = []
    assert home.publish(local, s1, expected_current=None, on_uploaded=uploaded.append) == s1
    assert sorted(uploaded) == [f for f in tree(local) if f != MANIFEST]
    assert home.current() == s1 and home.list_snapshots() == [s1]
    assert home.manifest(s1) == json.loads((local / MANIFEST).read_text())
    current = json.loads(home.get_object(CURRENT)[0])
    assert current["snapshot_id"] == s1 and "updated_at" in current   # the local home's CURRENT format

    got = home.fetch(s1, tmp_path / "cache")
    assert got == tmp_path / "cache" / s1
    assert tree(got) == tree(local)                                   # byte-identical, empty file included
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [s1]   # no temporary folder left

    def no_download(*args: Any) -> None:
        raise AssertionError("a cached snapshot was downloaded again")

    monkeypatch.setattr(home, "_transfer", no_download)
    assert home.fetch(s1, tmp_path / "cache") == got


def test_publish_from_a_stale_current_is_refused_before_uploading(home, tmp_path):
    s1, s2 = sid(1), sid(2)
    home.publish(local_snapshot(tmp_path, s1, 1), s1, expected_current=None)
    with pytest.raises(PublishConflict, match=r"\[stage=publish, dataset=CURRENT\].*lost a race.*nothing was "
                                              r"uploaded") as err:
        home.publish(local_snapshot(tmp_path, s2, 2), s2, expected_current=None)
    assert (err.value.expected, err.value.found, err.value.uploaded) == (None, s1, False)
    assert home.current() == s1 and keys_under(home, f"snapshots/{s2}") == []


def test_two_publishers_racing_from_the_same_current_one_wins(separate_home, tmp_path, monkeypatch):
    """Both read CURRENT (s1) at the switch, then A writes first: B's If-Match fails."""
    s1, sa, sb = sid(1), sid(2), sid(3)
    a, b = separate_home(), separate_home()
    a.publish(local_snapshot(tmp_path, s1, 1), s1, expected_current=None)
    both_read, a_done = threading.Barrier(2, timeout=20), threading.Event()

    def gate(h: ObjectHome, first: bool) -> None:
        real = h.put_object

        def put(rel: str, body: bytes, **kw: Any) -> str:
            if rel != CURRENT:
                return real(rel, body, **kw)
            both_read.wait()              # each has read CURRENT and its ETag by now
            if not first:
                a_done.wait(20)
            try:
                return real(rel, body, **kw)
            finally:
                a_done.set()

        monkeypatch.setattr(h, "put_object", put)

    gate(a, first=True)
    gate(b, first=False)
    results: dict[str, Any] = {}

    def run(name: str, h: ObjectHome, snapshot_id: str, seed: int) -> None:
        try:
            results[name] = h.publish(local_snapshot(tmp_path / name, snapshot_id, seed), snapshot_id, s1)
        except Exception as exc:  # noqa: BLE001 -- the test inspects it
            results[name] = exc

    threads = [threading.Thread(target=run, args=("a", a, sa, 2)), threading.Thread(target=run, args=("b", b, sb, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results["a"] == sa
    lost = results["b"]
    assert isinstance(lost, PublishConflict) and (lost.found, lost.uploaded) == (sa, True)
    msg = str(lost)
    assert "lost a race" in msg and f"switched CURRENT to snapshot {sa}" in msg
    assert "CURRENT was left as that publisher set it" in msg and "unreferenced prefix" in msg
    assert a.current() == sa == b.current()
    assert tree(b.fetch(sa, tmp_path / "cache")) == tree(tmp_path / "a" / sa)   # the winner's, complete
    assert sb in b.list_snapshots()       # the loser's complete snapshot stays, unreferenced, until pruned


def test_many_publishers_racing_freely_exactly_one_wins(separate_home, tmp_path):
    s0 = sid(0)
    separate_home().publish(local_snapshot(tmp_path, s0, 0), s0, expected_current=None)
    ids = [sid(n) for n in range(1, 5)]
    folders = [local_snapshot(tmp_path / f"p{n}", s, n) for n, s in enumerate(ids)]
    homes = [separate_home() for _ in ids]
    start, results = threading.Barrier(len(ids), timeout=20), {}

    def run(n: int) -> None:
        start.wait()
        try:
            results[n] = homes[n].publish(folders[n], ids[n], expected_current=s0)
        except PublishConflict as exc:
            results[n] = exc

    _all_at_once(run, len(ids))
    won = [r for r in results.values() if isinstance(r, str)]
    lost = [r for r in results.values() if isinstance(r, PublishConflict)]
    assert len(won) == 1 and len(lost) == len(ids) - 1
    assert homes[0].current() == won[0] and all(e.found == won[0] for e in lost)
    assert homes[0].manifest(won[0])["snapshot_id"] == won[0]


def test_a_publisher_killed_mid_upload_leaves_current_and_the_listing_unchanged(home, tmp_path):
    s1, s2 = sid(1), sid(2)
    home.publish(local_snapshot(tmp_path, s1, 1), s1, expected_current=None)

    def killed(rel: str) -> None:
        raise KeyboardInterrupt("killed after uploading " + rel)

    with pytest.raises(KeyboardInterrupt):
        home.publish(local_snapshot(tmp_path, s2, 2), s2, expected_current=s1, on_uploaded=killed)
    partial = keys_under(home, f"snapshots/{s2}")
    assert partial and MANIFEST not in partial                       # an orphan prefix, no manifest
    assert home.current() == s1 and home.list_snapshots() == [s1]
    with pytest.raises(StorageError, match=rf"\[stage=read, dataset={s2}\].*no manifest.json"):
        home.manifest(s2)
    with pytest.raises(StorageError, match="not found"):
        home.fetch(s2, tmp_path / "cache")
    assert not (tmp_path / "cache" / s2).exists()
    assert home.prune(retention=5) == []                             # young: maybe a live publisher
    assert home.prune(retention=5, orphan_age_s=0) == [s2]
    assert keys_under(home, f"snapshots/{s2}") == [] and home.current() == s1


def test_a_retried_switch_whose_first_attempt_landed_counts_as_won(home, tmp_path, monkeypatch):
    """The response of the PUT of CURRENT is lost and the client sends it again: the retry fails its
    If-Match against the first attempt's own write, and publish still reports success."""
    s1, s2 = sid(1), sid(2)
    home.publish(local_snapshot(tmp_path, s1, 1), s1, expected_current=None)
    real = home.put_object

    def put_twice(rel: str, body: bytes, **kw: Any) -> str:
        etag = real(rel, body, **kw)
        return real(rel, body, **kw) if rel == CURRENT else etag     # the retry: 412 from the store

    monkeypatch.setattr(home, "put_object", put_twice)
    assert home.publish(local_snapshot(tmp_path, s2, 2), s2, expected_current=s1) == s2
    assert home.current() == s2


def test_publish_refuses_an_incomplete_folder_and_a_published_id(home, tmp_path):
    s1 = sid(1)
    folder = local_snapshot(tmp_path, s1, 1)
    (folder / "items" / "part-00001.parquet").unlink()
    with pytest.raises(StorageError, match=r"\[stage=publish, dataset=.*\] .* lacks 1 file"):
        home.publish(folder, s1, expected_current=None)
    (folder / MANIFEST).unlink()
    with pytest.raises(StorageError, match="has no manifest.json"):
        home.publish(folder, s1, expected_current=None)
    with pytest.raises(StorageError, match="not a snapshot id"):
        home.publish(folder, "../x", expected_current=None)
    assert home.current() is None and keys_under(home, "snapshots") == []
    home.publish(local_snapshot(tmp_path / "ok", s1, 1), s1, expected_current=None)
    with pytest.raises(StorageError, match="immutable"):
        home.publish(local_snapshot(tmp_path / "again", s1, 9), s1, expected_current=s1)
    assert home.manifest(s1)["meta"] == {"seed": 1}


def test_fetch_refuses_files_that_do_not_match_the_manifest(home, tmp_path):
    s1 = sid(1)
    home.publish(local_snapshot(tmp_path, s1, 1), s1, expected_current=None)
    home.fs.pipe_file(home.path(f"snapshots/{s1}/items/part-00000.parquet"), b"tampered")
    with pytest.raises(StorageError, match=r"\[stage=fetch, dataset=items\].*fingerprint"):
        home.fetch(s1, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []                # no partial copy, no temp folder


def test_a_download_cut_off_midway_leaves_no_partial_copy(home, tmp_path, monkeypatch):
    from qarm_core.objectstore import _HOST

    s1 = sid(1)
    local = local_snapshot(tmp_path / "local", s1, 1)
    home.publish(local, s1, expected_current=None)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    leftover = cache / f".{s1}.tmp-{_HOST}_{proc.pid}.0123abcd"       # what a killed fetch left
    (leftover / "items").mkdir(parents=True)
    real, calls = home.fs._get_file, []

    async def flaky(rpath: str, lpath: str, **kw: Any) -> None:
        calls.append(rpath)
        if len(calls) == 3:
            raise ConnectionResetError("connection reset by peer")
        await real(rpath, lpath, **kw)

    monkeypatch.setattr(home.fs, "_get_file", flaky)
    with pytest.raises(ConnectionResetError):
        home.fetch(s1, cache)
    assert list(cache.iterdir()) == []                              # neither a partial copy nor temp folders
    monkeypatch.setattr(home.fs, "_get_file", real)
    assert tree(home.fetch(s1, cache)) == tree(local)


def test_prune_keeps_current_and_retention_and_unreferenced_young_snapshots(home, tmp_path):
    ids = [sid(n) for n in range(1, 5)]
    for n, (prev, s) in enumerate(zip([None, *ids[:2]], ids[:3]), start=1):
        home.publish(local_snapshot(tmp_path, s, n), s, expected_current=prev)
    # ids[3]: a complete snapshot newer than CURRENT that never became current (a race loser).
    loser = ObjectHome(home.url)
    loser.publish(local_snapshot(tmp_path, ids[3], 4), ids[3], expected_current=ids[2])
    home.put_object(CURRENT, json.dumps({"snapshot_id": ids[2]}).encode())   # undo: CURRENT is ids[2]
    assert home.current() == ids[2] and home.list_snapshots() == ids

    assert home.prune(retention=2) == [ids[0]]
    assert home.list_snapshots() == ids[1:]
    assert home.prune(retention=1) == [ids[1]]
    assert home.list_snapshots() == ids[2:]                          # CURRENT and the young loser
    assert home.prune(retention=1, orphan_age_s=0) == [ids[3]]
    assert home.list_snapshots() == [ids[2]] == [home.current()]
    assert home.prune(retention=1, orphan_age_s=0) == []             # never CURRENT's
    with pytest.raises(StorageError, match="not found"):
        home.manifest(ids[0])
    with pytest.raises(ValueError):
        home.prune(retention=0)


# ---------------------------------------------------------------- the lease object


def test_a_second_holder_is_refused_naming_the_first_until_it_releases(home_url):
    first = ObjectLease(ObjectHome(home_url), "codebook-refresh", ttl_s=60, heartbeat_s=10).acquire()
    first.annotate("run-1", "flow-1")
    home2 = ObjectHome(home_url)
    with pytest.raises(BusyError, match=r"in use by another codebook-refresh \(pid \d+ on .+, since "
                                        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, .*MLflow run run-1\)"):
        ObjectLease(home2, "other", ttl_s=60, heartbeat_s=10).acquire()
    assert ObjectLease(home2, "x").holder().flow_run_id == "flow-1"
    first.release()
    assert home2.get_object(LEASE) is None
    second = ObjectLease(home2, "other", ttl_s=60, heartbeat_s=10).acquire()
    assert second.taken_over is None and second.holder().purpose == "other"
    second.release()


def test_a_waiting_run_gets_the_lease_when_the_holder_releases(home_url):
    first = ObjectLease(ObjectHome(home_url), "a", ttl_s=60, heartbeat_s=10).acquire()
    threading.Timer(0.3, first.release).start()
    t0 = time.monotonic()
    with ObjectLease(ObjectHome(home_url), "b", ttl_s=60, heartbeat_s=10).acquire(wait_s=10, poll_s=0.05) as second:
        assert 0.2 < time.monotonic() - t0 < 5 and second.holder().purpose == "b"
    with pytest.raises(BusyError):
        with ObjectLease(ObjectHome(home_url), "c", ttl_s=60, heartbeat_s=10):
            ObjectLease(ObjectHome(home_url), "d", ttl_s=60, heartbeat_s=10).acquire(wait_s=0.2, poll_s=0.05)


def test_the_heartbeat_keeps_a_lease_alive_past_its_ttl(home_url):
    with ObjectLease(ObjectHome(home_url), "a", ttl_s=1.0, heartbeat_s=0.2) as held:
        time.sleep(1.3)
        with pytest.raises(BusyError, match="in use by another a "):
            ObjectLease(ObjectHome(home_url), "b", ttl_s=1.0, heartbeat_s=0.2).acquire()
        held.check()


def test_an_expired_lease_is_taken_over_and_its_stalled_holder_learns_it(home_url):
    stalled = ObjectLease(ObjectHome(home_url), "a", ttl_s=1.0, heartbeat_s=0.2).acquire()
    stalled._stop.set()                     # frozen: no more heartbeats
    stalled._thread.join(5)
    fresh = ObjectLease(ObjectHome(home_url), "b", ttl_s=1.0, heartbeat_s=0.2)
    with pytest.raises(BusyError):          # not expired yet
        fresh.acquire()
    time.sleep(1.1)
    fresh.acquire()
    assert fresh.taken_over.owner == stalled.owner and fresh.taken_over.purpose == "a"
    with pytest.raises(LeaseLost, match="taken over by another run"):
        stalled.heartbeat()
    with pytest.raises(LeaseLost, match="taken over"):
        stalled.check()
    stalled.release()                       # deletes nothing: the lease is fresh's now
    assert fresh.holder().owner == fresh.owner
    fresh.check()
    fresh.release()
    assert fresh.holder() is None


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(home_url):
    home = ObjectHome(home_url)
    dead = ObjectLease(home, "killed", ttl_s=60, heartbeat_s=10).acquire()
    dead._stop.set()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    info = json.loads(home.get_object(LEASE)[0])
    home.put_object(LEASE, json.dumps({**info, "pid": proc.pid}).encode())   # its holder was SIGKILLed
    with ObjectLease(ObjectHome(home_url), "next", ttl_s=60, heartbeat_s=10) as taker:
        assert taker.taken_over.pid == proc.pid
        with pytest.raises(LeaseLost):
            dead.check()


def test_concurrent_acquirers_of_a_free_lease_one_wins(separate_home):
    leases = [ObjectLease(separate_home(), f"r{n}", ttl_s=60, heartbeat_s=10) for n in range(4)]
    start, results = threading.Barrier(len(leases), timeout=20), {}

    def run(n: int) -> None:
        start.wait()
        try:
            results[n] = leases[n].acquire()
        except BusyError as exc:
            results[n] = exc

    _all_at_once(run, len(leases))
    won = [r for r in results.values() if isinstance(r, ObjectLease)]
    assert len(won) == 1 and sum(isinstance(r, BusyError) for r in results.values()) == len(leases) - 1
    assert won[0].holder().owner == won[0].owner
    won[0].release()


# ---------------------------------------------------------------- Storage on an s3:// home
def test_storage_on_an_s3_home_publishes_reads_and_prunes_through_the_store(home_url, tmp_path, monkeypatch):
    """``Storage(s3://...)``: working folders under QARM_LOCAL_ROOT, snapshots and CURRENT in the
    store; a publish from a snapshot other than CURRENT is refused (nothing moves); a second machine
    (an empty local root) reads the published datasets back byte for byte; prune removes the pruned
    snapshots' local copies too."""
    import pyarrow as pa

    from qarm_core.schemas import SCHEMAS
    from qarm_core.storage import LOCAL_ROOT_ENV, Storage, read_dataset, write_parquet_dataset

    monkeypatch.setenv(LOCAL_ROOT_ENV, str(tmp_path / "machine-a"))
    st = Storage(home_url)
    assert st.url == home_url.rstrip("/") and st.where == st.url
    assert st.home.is_relative_to(tmp_path / "machine-a") and st.current() is None and st.list_snapshots() == []
    items = pa.table({"item_id": pa.array([1, 2, 3], pa.int64()), "title": ["a", "b", "c"]})
    schema = SCHEMAS["items"]
    table = pa.table({c: items[c] if c in items.column_names else pa.nulls(3, schema.schema.field(c).type)
                      for c in schema.schema.names}, schema=schema.schema)
    rec = write_parquet_dataset(st.ensure().staging_dir / "items", table.to_batches(), schema)
    first = st.publish({"items": rec}, expect_parent=None)
    assert st.current().snapshot_id == first.snapshot_id and not (st.home / "CURRENT").exists()
    with pytest.raises(PublishConflict, match="CURRENT"):
        st.publish({"items": rec}, expect_parent=None)            # this run did not start from CURRENT
    assert st.list_snapshots() == [first.snapshot_id]
    second = st.publish({"items": rec}, expect_parent=first.snapshot_id, retention=1)
    assert st.list_snapshots() == [second.snapshot_id]
    assert not (st.snapshots_dir / first.snapshot_id).exists()    # the pruned snapshot's local copy too

    monkeypatch.setenv(LOCAL_ROOT_ENV, str(tmp_path / "machine-b"))
    other = Storage(home_url)
    assert other.home != st.home and other.current().snapshot_id == second.snapshot_id
    assert read_dataset(other.published("items")).equals(table)


def test_a_downloaded_dataset_is_checked_against_its_manifest_entry(tmp_path):
    """One check for a fetched snapshot and a worker's scratch copy of one of its datasets: every
    file the entry lists present, and their hash the entry's fingerprint."""
    from qarm_core.objectstore import check_downloaded_dataset
    from qarm_core.scratch import _check_dataset
    from qarm_core.storage import hash_files

    folder = tmp_path / "items"
    folder.mkdir()
    (folder / "part-0.parquet").write_bytes(b"one")
    (folder / "part-1.parquet").write_bytes(b"two")
    entry = {"files": ["part-0.parquet", "part-1.parquet"], "fingerprint": hash_files(sorted(folder.iterdir()))}
    check_downloaded_dataset("fetch", "s1", "items", entry, folder)
    _check_dataset({"datasets": {"items": entry}}, "s1", "items", folder)
    with pytest.raises(StorageError, match=r"\[stage=scratch, dataset=codes\] snapshot s1 has no dataset"):
        _check_dataset({"datasets": {"items": entry}}, "s1", "codes", folder)
    (folder / "part-1.parquet").write_bytes(b"tw0")
    with pytest.raises(StorageError, match=r"\[stage=scratch, dataset=items\].*do not match.*fingerprint"):
        _check_dataset({"datasets": {"items": entry}}, "s1", "items", folder)
    (folder / "part-1.parquet").unlink()
    with pytest.raises(StorageError, match=r"\[stage=fetch, dataset=items\] snapshot s1 lacks \['part-1.parquet'\]"):
        check_downloaded_dataset("fetch", "s1", "items", entry, folder)
