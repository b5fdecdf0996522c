"""QARM_HOME layout, Parquet dataset IO and atomic snapshot publishing.

Layout (every path qarm uses is built here)::

    <home>/
      CURRENT                     pointer: JSON naming the published snapshot (replaced atomically)
      snapshots/<snapshot_id>/    complete, immutable snapshots; manifest.json + one folder per dataset
      staging/                    snapshots being assembled (invisible to readers)
      work/<stage>/<key>/         staged stage outputs keyed by input fingerprints (the rerun cache)
      cache/                      downloads (e.g. the recbole wheel)
      tmp/duckdb/                 DuckDB spill directory (size-capped in config)
      logs/<command>-<time>.log   each CLI flow command's full log, tracebacks included (never pruned)

Publishing writes the snapshot under ``staging/``, fsyncs it, renames it into ``snapshots/`` and
only then replaces ``CURRENT`` (write a temp file, fsync, ``os.replace``). A reader that follows
``CURRENT`` therefore never sees half a snapshot, and a crash at any point leaves the previously
published snapshot and the pointer to it untouched.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from qarm_core import __version__
from qarm_core.base import Strict
from qarm_core.errors import StorageError
from qarm_core.lease import pid_alive as _pid_alive
from qarm_core.schemas import DatasetSchema, schema_for


class StorageConfig(Strict):
    # Number of published snapshots kept, the current one included.
    retention: int = Field(5, ge=1)
    # Staged stage outputs (the rerun cache) older than this are deleted after a publish.
    work_ttl_hours: float = Field(72.0, ge=0.0)


MANIFEST = "manifest.json"
STAGE_DONE = "_SUCCESS.json"
CURRENT = "CURRENT"
# A stage's ``parent`` when it is called on its own (a test, a one-off call): the snapshot CURRENT
# names when the stage reads. A refresh passes the snapshot it started from instead (``Storage.as_of``).
CURRENT_AT_READ = "current-at-read"
ROWS_PER_FILE = 5_000_000


@dataclass(frozen=True)
class DatasetRecord:
    """What a stage wrote: the next stage takes this as its input contract."""

    dataset: str
    path: str                 # folder holding part-*.parquet
    rows: int
    schema_version: int
    fingerprint: str          # content hash of the Parquet files
    files: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = list(self.files)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetRecord":
        return cls(**{**d, "files": tuple(d.get("files", ()))})

    @property
    def glob(self) -> str:
        return str(Path(self.path) / "*.parquet")


@dataclass(frozen=True)
class Snapshot:
    snapshot_id: str
    path: str
    manifest: dict = field(default_factory=dict)

    def record(self, dataset: str) -> DatasetRecord:
        try:
            meta = self.manifest["datasets"][dataset]
        except KeyError:
            raise StorageError(f"snapshot {self.snapshot_id} has no dataset {dataset!r}; "
                               f"it holds {sorted(self.manifest.get('datasets', {}))}") from None
        return DatasetRecord(dataset=dataset, path=str(Path(self.path) / dataset), rows=meta["rows"],
                             schema_version=meta["schema_version"], fingerprint=meta["fingerprint"],
                             files=tuple(meta["files"]))


_HOST = "".join(c if c.isalnum() else "_" for c in __import__("socket").gethostname())[:40] or "host"


def _owner_tag() -> str:
    """``<host>_<pid>`` in the name of every temporary folder: whose it is, for ``remove_dead_leftovers``."""
    return f"{_HOST}_{os.getpid()}"


def _owner_of(name: str) -> tuple[str, int] | None:
    """(host, pid) from a temporary folder's name, None for names without an owner tag."""
    import re

    m = re.search(r"[.-]([A-Za-z0-9_]+)_(\d+)[.-][0-9a-f]{6,8}$", name)
    return (m.group(1), int(m.group(2))) if m else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def hash_files(paths: Iterable[Path], chunk: int = 1 << 22) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_parquet_dataset(folder: Path, batches: Iterable[pa.RecordBatch | pa.Table],
                          schema: DatasetSchema, rows_per_file: int = ROWS_PER_FILE) -> DatasetRecord:
    """Write batches conforming to ``schema`` as ``folder/part-NNNNN.parquet`` files, fsynced.

    The folder must not exist yet; callers write into a staging location and rename.
    """
    folder.mkdir(parents=True, exist_ok=False)
    files: list[Path] = []
    writer: pq.ParquetWriter | None = None
    rows_in_file = 0
    total = 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            fsync_file(files[-1])
            writer = None

    for batch in batches:
        if batch.num_rows == 0:
            continue
        if not batch.schema.equals(schema.schema):
            raise StorageError(f"dataset {schema.name}: batch schema {batch.schema} does not match "
                               f"the declared schema {schema.schema}")
        offset = 0
        while offset < batch.num_rows:
            if writer is None:
                files.append(folder / f"part-{len(files):05d}.parquet")
                writer = pq.ParquetWriter(files[-1], schema.schema, compression="zstd")
                rows_in_file = 0
            take = min(batch.num_rows - offset, rows_per_file - rows_in_file)
            writer.write(batch.slice(offset, take))
            offset += take
            rows_in_file += take
            total += take
            if rows_in_file >= rows_per_file:
                close()
    close()
    if not files:  # an empty dataset still has a readable file with the schema
        files.append(folder / "part-00000.parquet")
        pq.write_table(schema.schema.empty_table(), files[0])
        fsync_file(files[0])
    fsync_dir(folder)
    return DatasetRecord(dataset=schema.name, path=str(folder), rows=total, schema_version=schema.version,
                         fingerprint=hash_files(files), files=tuple(f.name for f in files))


def artifact_record(name: str, folder: Path, format_version: int) -> DatasetRecord:
    """The record of a folder of non-tabular files (a model, a codebook): every file under it, by
    relative path, fingerprinted like a dataset. ``rows`` is the number of files."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if not files:
        raise StorageError(f"artifact {name}: {folder} holds no files")
    for f in files:
        fsync_file(folder / f)
    return DatasetRecord(dataset=name, path=str(folder), rows=len(files), schema_version=format_version,
                         fingerprint=hash_files(folder / f for f in files), files=tuple(files))


def read_dataset(record: DatasetRecord, columns: list[str] | None = None) -> pa.Table:
    """Read a whole dataset into memory (small datasets; use DuckDB for big ones)."""
    schema = schema_for(record.dataset)
    if record.schema_version != schema.version:
        raise StorageError(f"dataset {record.dataset} at {record.path} has schema version "
                           f"{record.schema_version}; this qarm reads version {schema.version}")
    tables = [pq.read_table(Path(record.path) / f, columns=columns) for f in record.files]
    return pa.concat_tables(tables) if tables else schema.schema.empty_table()


REMOTE_SCHEMES = ("s3://",)
# Where an object-store home keeps its local folders (staging, work, logs, caches, fetched snapshots).
LOCAL_ROOT_ENV = "QARM_LOCAL_ROOT"


def is_remote_home(home: str | os.PathLike) -> bool:
    """Whether ``home`` is an object-store URL (``s3://bucket/prefix``) rather than a folder."""
    return str(home).startswith(REMOTE_SCHEMES)


def local_root(home: str | os.PathLike) -> Path:
    """The folder holding a home's local state: the home itself, or for an ``s3://`` home
    ``$QARM_LOCAL_ROOT/<bucket>-<prefix>-<digest>`` (default under ``~/.cache/qarm/homes``): staging,
    work (the rerun cache), logs, DuckDB spill, the MLflow store by default, and the snapshots it
    fetched (immutable, so a cached copy never goes stale)."""
    if not is_remote_home(home):
        return Path(home).expanduser().resolve()
    import hashlib

    url = str(home).rstrip("/")
    base = Path(os.environ.get(LOCAL_ROOT_ENV) or Path.home() / ".cache" / "qarm" / "homes").expanduser()
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in url.split("://", 1)[1])[:60]
    return (base / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:8]}").resolve()


def new_snapshot_id(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


class Storage:
    """Paths and publishing under one QARM_HOME: a folder, or an ``s3://`` URL whose snapshots and
    CURRENT live on the object store (``qarm_core.objectstore``: unique prefixes, CURRENT switched by a
    conditional write) while its working folders stay local (``local_root``); ``home`` is then that
    local folder and ``url`` the store's."""

    def __init__(self, home: str | os.PathLike):
        self.url = str(home).rstrip("/") if is_remote_home(home) else None
        self.home = local_root(home)
        self._remote = None
        self._as_of: tuple[str | None] | None = None     # (pinned snapshot id,), or None: CURRENT

    def as_of(self, snapshot_id: str | None) -> "Storage":
        """This home as a run sees it: ``published`` answers from snapshot ``snapshot_id`` (None: the
        home had none when the run started) whatever CURRENT names later, so that every stage of a
        refresh learns from the snapshot chosen at its start. ``CURRENT_AT_READ``: this storage itself."""
        if snapshot_id == CURRENT_AT_READ:
            return self
        view = copy.copy(self)
        view._as_of = (snapshot_id,)
        return view

    @property
    def remote(self):
        """The ``ObjectHome`` of an ``s3://`` home (None for a folder)."""
        if self.url is not None and self._remote is None:
            from qarm_core.objectstore import ObjectHome

            self._remote = ObjectHome(self.url)
        return self._remote

    @property
    def where(self) -> str:
        """The home as the user named it (the URL of an object-store home)."""
        return self.url or str(self.home)

    # ---- paths
    @property
    def snapshots_dir(self) -> Path:
        return self.home / "snapshots"

    @property
    def staging_dir(self) -> Path:
        return self.home / "staging"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def current_file(self) -> Path:
        return self.home / CURRENT

    def cache_dir(self, name: str) -> Path:
        return self.home / "cache" / name

    @property
    def duckdb_temp_dir(self) -> Path:
        return self.home / "tmp" / "duckdb"

    @property
    def train_nodes_board(self) -> Path:
        """Where node 0 of a multi-node training run posts its job for the other nodes' ``qarm
        train-node`` (``embed.train.nodes``); like the run folders, on storage every node mounts."""
        return self.home / "nodes" / "train"

    def report_dir(self, snapshot_id: str) -> Path:
        """Where ``qarm evaluate`` writes report.md and its plots for a snapshot."""
        return self.home / "reports" / snapshot_id

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.work_dir / stage / key

    def run_dir(self, stage: str, key: str) -> Path:
        """A stage's resumable scratch folder (checkpoints, embedding parts): unlike staging, it
        survives a crash so that the rerun continues where the killed one stopped."""
        return self.work_dir / stage / f"{key}.run"

    def ensure(self) -> "Storage":
        for d in (self.snapshots_dir, self.staging_dir, self.work_dir, self.duckdb_temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # ---- staged stage outputs (the rerun cache)
    def staged_records(self, stage: str, key: str) -> dict[str, DatasetRecord] | None:
        """Records of a finished stage output, or None if that output is absent or incomplete."""
        done = self.stage_dir(stage, key) / STAGE_DONE
        if not done.is_file():
            return None
        meta = json.loads(done.read_text())
        records = {name: DatasetRecord.from_dict(r) for name, r in meta["records"].items()}
        if not all((Path(r.path) / f).is_file() for r in records.values() for f in r.files):
            return None
        return records

    @contextlib.contextmanager
    def staging_stage(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a private folder to write a stage output into; on success it becomes
        ``work/<stage>/<key>`` in one rename, on failure it is removed."""
        final = self.stage_dir(stage, key)
        tmp = final.parent / f".tmp-{key}-{_owner_tag()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            if (final / STAGE_DONE).is_file():
                return  # a concurrent run finished the same output first: keep theirs, drop ours
            if final.exists():
                # An incomplete folder from a crashed attempt (complete ones carry STAGE_DONE):
                # move it aside first so that the rename below is the only visible change.
                stale = final.parent / f".stale-{key}-{uuid.uuid4().hex[:8]}"
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def finish_stage(self, folder: Path, records: dict[str, DatasetRecord], report: dict | None = None) -> None:
        """Mark a staging folder complete (called inside ``staging_stage`` before the rename)."""
        write_json_atomic(folder / STAGE_DONE, {"records": {k: v.to_dict() for k, v in records.items()},
                                                "report": report or {}, "written_at": time.time()})

    @staticmethod
    def rebase(records: dict[str, DatasetRecord], old: Path, new: Path) -> dict[str, DatasetRecord]:
        """Records written inside a staging folder, pointed at the folder's final place."""
        out = {}
        for name, r in records.items():
            rel = Path(r.path).relative_to(old)
            out[name] = DatasetRecord(**{**r.to_dict(), "path": str(new / rel), "files": r.files})
        return out

    # ---- snapshots
    def current(self) -> Snapshot | None:
        if self.remote is not None:
            sid = self.remote.current()
            return None if sid is None else self.snapshot(sid)
        # A concurrent publish may prune the snapshot CURRENT named between reading CURRENT and
        # reading that snapshot's manifest: then CURRENT names a newer one, which is read instead.
        for _ in range(20):
            sid = self._current_id()
            if sid is None:
                return None
            try:
                return self.snapshot(sid)
            except (StorageError, FileNotFoundError):
                if self._current_id() == sid:
                    raise
        raise StorageError(f"{self.current_file} kept moving to pruned snapshots")

    def _current_id(self) -> str | None:
        try:
            return json.loads(self.current_file.read_text())["snapshot_id"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError) as exc:
            raise StorageError(f"{self.current_file} is unreadable: {exc}") from None

    def base(self) -> Snapshot | None:
        """The snapshot a run reads from: the one pinned by ``as_of``, else the one CURRENT names."""
        if self._as_of is None:
            return self.current()
        return None if self._as_of[0] is None else self.snapshot(self._as_of[0])

    def published(self, dataset: str) -> DatasetRecord | None:
        """The ``base`` snapshot's ``dataset`` (a later stage's cache), or None if there is none yet."""
        snap = self.base()
        if snap is None or dataset not in snap.manifest.get("datasets", {}):
            return None
        return snap.record(dataset)

    def published_cache(self, dataset: str) -> DatasetRecord | None:
        """``published(dataset)`` when its schema version is the one this qarm reads, else None: a
        snapshot published by an older qarm is then no cache (the stage recomputes) instead of an
        error that would stop the first refresh after an upgrade."""
        rec = self.published(dataset)
        if rec is None:
            return None
        try:
            version = schema_for(dataset).version
        except KeyError:             # an artifact (model, codebook): versioned by its own format
            return rec
        return rec if rec.schema_version == version else None

    def snapshot(self, snapshot_id: str) -> Snapshot:
        if self.remote is not None:          # a local copy, fetched once (snapshots are immutable)
            path = self.remote.fetch(snapshot_id, self.snapshots_dir)
            return Snapshot(snapshot_id=snapshot_id, path=str(path),
                            manifest=json.loads((path / MANIFEST).read_text()))
        path = self.snapshots_dir / snapshot_id
        mf = path / MANIFEST
        if not mf.is_file():
            raise StorageError(f"snapshot {snapshot_id} not found under {self.snapshots_dir}")
        return Snapshot(snapshot_id=snapshot_id, path=str(path), manifest=json.loads(mf.read_text()))

    def list_snapshots(self) -> list[str]:
        if self.remote is not None:
            return self.remote.list_snapshots()
        if not self.snapshots_dir.is_dir():
            return []
        return sorted(p.name for p in self.snapshots_dir.iterdir() if (p / MANIFEST).is_file())

    @contextlib.contextmanager
    def _publish_lock(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".publish.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def publish(self, records: dict[str, DatasetRecord], meta: dict | None = None,
                retention: int | None = None, publish_key: str | None = None,
                expect_parent: str | None | bool = False) -> Snapshot:
        """Publish ``records`` as a new snapshot and point CURRENT at it.

        ``expect_parent``: the snapshot id (None: no snapshot) the run started from; when CURRENT
        names another one at the moment of publishing, nothing is published (StorageError): a run
        never replaces a snapshot it did not learn from. ``False`` skips the check.

        Dataset files are hard-linked (copied across filesystems) from where the stages wrote
        them, so publishing costs no data copy and the staged files stay reusable.
        ``publish_key`` (e.g. the flow run's id) makes a retry idempotent: if CURRENT was already
        published under that key with the same dataset fingerprints, it is returned as it is.
        """
        self.ensure()
        cur = self.current() if publish_key is not None else None
        if publish_key is not None and cur is not None \
                and cur.manifest.get("publish_key") == publish_key \
                and {n: d["fingerprint"] for n, d in cur.manifest["datasets"].items()} \
                == {n: r.fingerprint for n, r in records.items()}:
            return cur
        sid = new_snapshot_id()
        tmp = self.staging_dir / f"{sid}.{_owner_tag()}.{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        try:
            datasets = {}
            for name, rec in sorted(records.items()):
                dst = tmp / name
                dst.mkdir()
                for f in rec.files:
                    src = Path(rec.path) / f
                    if not src.is_file():
                        raise StorageError(f"cannot publish {name}: {src} is missing")
                    (dst / f).parent.mkdir(parents=True, exist_ok=True)   # artifacts have subfolders
                    _link_or_copy(src, dst / f)
                for d in sorted({(dst / f).parent for f in rec.files}, key=lambda p: -len(p.parts)):
                    fsync_dir(d)
                datasets[name] = {"rows": rec.rows, "schema_version": rec.schema_version,
                                  "fingerprint": rec.fingerprint, "files": list(rec.files)}
            manifest = {"snapshot_id": sid, "created_at": datetime.now(timezone.utc).isoformat(),
                        "qarm_version": __version__, "datasets": datasets, "meta": meta or {},
                        "publish_key": publish_key}
            write_json_atomic(tmp / MANIFEST, manifest)
            fsync_dir(tmp)
            if self.remote is not None:
                # the store's conditional switch of CURRENT is the lock; PublishConflict if it moved
                expected = expect_parent if expect_parent is not False else self.remote.current()
                self.remote.publish(tmp, sid, expected)
                os.rename(tmp, self.snapshots_dir / sid)       # the local copy is the fetched one
                return self._after_publish(sid, manifest, retention)
            with self._publish_lock():
                if expect_parent is not False:
                    now = self.current()
                    now_id = now.snapshot_id if now is not None else None
                    if now_id != expect_parent:
                        raise StorageError(f"CURRENT moved from {expect_parent} to {now_id} while this run "
                                           "worked; nothing is published (rerun to learn from the new snapshot)")
                os.rename(tmp, self.snapshots_dir / sid)
                fsync_dir(self.snapshots_dir)
                self._set_current(sid)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self._after_publish(sid, manifest, retention)

    def _after_publish(self, sid: str, manifest: dict, retention: int | None) -> Snapshot:
        published = Snapshot(snapshot_id=sid, path=str(self.snapshots_dir / sid), manifest=manifest)
        if retention is not None:
            # A concurrent publisher may already have superseded (and so may prune) this snapshot.
            self.prune(retention)
        return published

    def _set_current(self, snapshot_id: str) -> None:
        write_json_atomic(self.current_file, {"snapshot_id": snapshot_id,
                                              "updated_at": datetime.now(timezone.utc).isoformat()})

    def prune(self, retention: int) -> list[str]:
        """Delete the oldest snapshots beyond ``retention``; never the current one.

        Runs under the publish lock, so a concurrent publish cannot move CURRENT to a snapshot
        this call is about to delete.
        """
        if self.remote is not None:
            removed = self.remote.prune(retention)
            kept = set(self.remote.list_snapshots())
            for p in self.snapshots_dir.glob("*") if self.snapshots_dir.is_dir() else ():
                if p.is_dir() and not p.name.startswith(".") and p.name not in kept:
                    shutil.rmtree(p, ignore_errors=True)     # a fetched copy of a pruned snapshot
            return removed
        with self._publish_lock():
            return self._prune_locked(retention)

    def _prune_locked(self, retention: int) -> list[str]:
        cur = self.current()
        keep_current = cur.snapshot_id if cur else None
        ids = self.list_snapshots()
        removable = [s for s in ids if s != keep_current]
        excess = len(ids) - retention
        removed = []
        for sid in removable[:max(excess, 0)]:
            shutil.rmtree(self.snapshots_dir / sid)
            removed.append(sid)
        # Pointer drafts of crashed publishes are never read; under the lock no live publisher
        # owns one, since drafts are only written while holding it.
        for p in self.home.glob(f".{CURRENT}.*.tmp"):
            p.unlink(missing_ok=True)
        # Snapshots being assembled are written outside the lock: only old leftovers go.
        if self.staging_dir.is_dir():
            for p in self.staging_dir.iterdir():
                if time.time() - p.stat().st_mtime > 3600:
                    shutil.rmtree(p, ignore_errors=True)
        return removed

    def remove_dead_leftovers(self) -> list[str]:
        """Remove the temporary folders (snapshot staging, stage outputs being written) whose writing
        process is gone from this host: what a killed run leaves. Folders of live processes, of other
        hosts, and of older qarm versions (no owner in the name; they expire by age) stay. Returns
        the names removed."""
        found = []
        if self.staging_dir.is_dir():
            found += list(self.staging_dir.iterdir())
        if self.work_dir.is_dir():
            found += [p for stage in self.work_dir.iterdir() if stage.is_dir() for p in stage.glob(".tmp-*")]
        removed = []
        for p in found:
            owner = _owner_of(p.name)
            if owner is not None and owner[0] == _HOST and not _pid_alive(owner[1]):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return sorted(removed)

    def prune_work(self, ttl_hours: float, keep: Iterable[str] = ()) -> int:
        """Delete staged stage outputs older than ``ttl_hours`` (not those in ``keep``)."""
        keep_set = {str(Path(k).resolve()) for k in keep}
        removed = 0
        if not self.work_dir.is_dir():
            return 0
        cutoff = time.time() - ttl_hours * 3600
        for stage in self.work_dir.iterdir():
            for out in stage.iterdir() if stage.is_dir() else ():
                if str(out.resolve()) in keep_set or out.stat().st_mtime > cutoff:
                    continue
                shutil.rmtree(out, ignore_errors=True)
                removed += 1
        return removed


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        fsync_file(dst)


def write_stage_outputs(storage: Storage, stage: str, key: str,
                        outputs: dict[str, tuple[DatasetSchema, Callable[[], Iterable[pa.RecordBatch]]]],
                        report: dict | None = None,
                        artifacts: dict[str, tuple[int, Callable[[Path], None]]] | None = None,
                        ) -> tuple[dict[str, DatasetRecord], bool, dict]:
    """Write a stage's datasets under ``work/<stage>/<key>``, or reuse them if already there.

    ``outputs`` maps dataset name to (schema, zero-argument function yielding batches); the batches
    are only produced when the output is not cached. ``artifacts`` maps a name to (format version,
    function writing files into the folder it is given), for outputs that are not tables (a model,
    a codebook); they are produced after the datasets. ``report`` is a dict the producers may fill
    (counts, timings); it is stored with the output. Returns (records, reused, report), the report
    being the stored one when the output is reused.
    """
    cached = storage.staged_records(stage, key)
    if cached is not None:
        done = json.loads((storage.stage_dir(stage, key) / STAGE_DONE).read_text())
        return cached, True, done.get("report", {})
    report = {} if report is None else report
    final = storage.stage_dir(stage, key)
    with storage.staging_stage(stage, key) as tmp:
        records = {name: write_parquet_dataset(tmp / name, make_batches(), schema)
                   for name, (schema, make_batches) in outputs.items()}
        for name, (version, write) in (artifacts or {}).items():
            (tmp / name).mkdir()
            write(tmp / name)
            records[name] = artifact_record(name, tmp / name, version)
            fsync_dir(tmp / name)
        records = Storage.rebase(records, tmp, final)
        storage.finish_stage(tmp, records, report)
    return records, False, report


# ---------------------------------------------------------------- CLI outputs (--out)
OUTPUT_MARK = ".qarm-output.json"          # in every folder a qarm command published at --out
PARQUET_MARK = b"qarm.output"              # Parquet metadata key of every file it published


def is_qarm_output(path: Path) -> bool:
    """Whether ``path`` is something a qarm command published (a folder with ``OUTPUT_MARK``, or a
    Parquet file whose metadata holds ``PARQUET_MARK``): the only things ``--overwrite`` replaces."""
    if path.is_dir():
        return (path / OUTPUT_MARK).is_file()
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return PARQUET_MARK in meta


def mark_output_table(table: pa.Table, command: str) -> pa.Table:
    """``table`` with the metadata that lets ``--overwrite`` recognise the file later."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}), PARQUET_MARK: command.encode()})


def check_output(out: Path, kind: str, overwrite: bool, stage: str) -> None:
    """Refuse an ``--out`` that cannot be written safely, before any work: the wrong kind of thing
    (``kind`` is ``"folder"`` or ``"file"``), an existing path without ``overwrite``, or an existing
    path that is not a qarm output (never replaced, even with ``overwrite``)."""
    from qarm_core.errors import DataError

    if out.parent.exists() and not out.parent.is_dir():
        raise DataError(stage, "out", f"--out {out}: its parent {out.parent} is a file")
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink():
        raise DataError(stage, "out", f"--out {out} is a symbolic link; give a plain path")
    if kind == "folder" and not out.is_dir():
        raise DataError(stage, "out", f"--out {out} is a file; this command writes a folder")
    if kind == "file" and out.is_dir():
        raise DataError(stage, "out", f"--out {out} is a folder; this command writes one Parquet file")
    if not is_qarm_output(out):
        raise DataError(stage, "out", f"--out {out} exists and is not a qarm output: it is never replaced; "
                                      "choose another path")
    if not overwrite:
        raise DataError(stage, "out", f"--out {out} exists (an earlier qarm output); pass --overwrite to replace it")


@contextlib.contextmanager
def staged_output(out: Path, kind: str, overwrite: bool, stage: str) -> Iterator[Path]:
    """Write ``out`` safely: checked first (``check_output``), written into a new temporary folder
    beside it (the path yielded: that folder, or a file in it), then renamed into place; an earlier
    qarm output there is moved aside first and removed after. Whatever fails, ``out`` is either the
    earlier output or the new one, never half of one, and the temporary folder is removed."""
    import tempfile

    check_output(out, kind, overwrite, stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    target = tmp / "out" if kind == "folder" else tmp / out.name
    old = tmp / "old"
    try:
        if kind == "folder":
            target.mkdir()
        yield target
        if kind == "folder":
            write_json_atomic(target / OUTPUT_MARK, {"command": stage, "qarm_version": __version__,
                                                     "written_at": datetime.now(timezone.utc).isoformat()})
        check_output(out, kind, overwrite, stage)          # again: something may have appeared meanwhile
        moved = out.exists()
        if moved:
            os.rename(out, old)
        try:
            os.rename(target, out)
        except BaseException:
            if moved:
                os.rename(old, out)                        # the earlier output stays as it was
            raise
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
