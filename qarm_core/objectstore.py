"""A QARM_HOME on an S3-compatible object store (``s3://bucket/prefix``): atomic snapshot publishing
and the refresh lease, with the guarantees of the local home (``qarm_core.storage``, ``qarm_core.lease``).

Layout under ``s3://<bucket>/<prefix>/`` (the names of a local home)::

    CURRENT                        JSON naming the published snapshot: {"snapshot_id", "updated_at"}
    snapshots/<snapshot_id>/...    one immutable snapshot per id: its files, manifest.json written last
    LEASE                          the refresh lease: JSON of ``qarm_core.lease.LeaseInfo``

Access goes through fsspec/s3fs (imported when an ``ObjectHome`` is made, so importing this module
is cheap). The endpoint is the ``endpoint_url`` argument, else ``AWS_ENDPOINT_URL_S3``, else
``AWS_ENDPOINT_URL`` (else AWS itself); credentials come from botocore's usual chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).

Consistency model
-----------------
S3 has no rename and no multi-object transaction. What it does give (since December 2020) is strong
read-after-write consistency: once a PUT or DELETE returns, every later GET, HEAD and LIST sees it;
and (since August/November 2024) conditional writes: a PUT with ``If-None-Match: *`` only creates,
a PUT with ``If-Match: <ETag>`` only replaces that exact version, so concurrent writers of one key
are serialised and all but one get ``412 Precondition Failed``. This module builds on exactly that:

* Publish uploads every file of a snapshot under a prefix of its own, ``snapshots/<id>/`` (ids are
  unique), then ``manifest.json`` (the completeness mark: only prefixes with one are snapshots),
  then replaces ``CURRENT`` with a conditional PUT: ``If-Match`` the ETag of the ``CURRENT`` it read
  (``If-None-Match: *`` when there was none). Of several publishers that started from the same
  ``CURRENT`` exactly one wins; the others get ``PublishConflict`` and ``CURRENT`` stays as the
  winner set it.
* A reader reads ``CURRENT`` once and sees the old or the new snapshot id, never a mix; every file
  of the snapshot it names was acknowledged before that ``CURRENT`` was written, so (strong
  consistency) the reader finds all of them. It never sees half a snapshot.
* A killed publisher leaves an orphan prefix: without a manifest (killed while uploading) it is
  invisible (``list_snapshots``, ``manifest`` and ``fetch`` ignore it); with one (killed, or lost a
  race, before ``CURRENT`` moved) it is a complete snapshot nothing refers to. ``CURRENT`` is
  unchanged either way, and ``prune`` deletes such prefixes once older than ``orphan_age_s``.
  Multipart uploads cut off mid-file are invisible too; a bucket lifecycle rule
  (``AbortIncompleteMultipartUpload``) frees their parts.
* A client retry of a conditional PUT whose first attempt landed (a lost response) fails against
  its own write; ``publish`` then re-reads ``CURRENT`` and counts a ``CURRENT`` naming its own
  snapshot id as success (ids are unique, so nobody else wrote that).
* ``prune`` deletes, beyond ``retention``, only snapshots older (by id, i.e. by creation time) than
  the one ``CURRENT`` names: a publisher that can still win started from that ``CURRENT``, so its
  own id is newer and its snapshot is never pruned under it. It deletes a snapshot's manifest
  first, so an interrupted prune leaves an orphan, never a snapshot that looks complete but is not.
  As in the local home, a reader still fetching a snapshot that prune removes (CURRENT moved on
  past ``retention``) fails loudly (``fetch`` raises; no partial cached copy).
* The lease is the object ``LEASE``, created with ``If-None-Match: *``, renewed by its holder with
  ``If-Match`` its own last ETag, taken over (heartbeat older than ``ttl_s``) with ``If-Match`` the
  expired version's ETag: at most one run holds it, and a holder that was taken over learns so at
  its next heartbeat or ``check``. Heartbeat times are the holders' clocks: hosts must agree to well
  within ``ttl_s`` (NTP).

Why conditional writes and not a lock object: the probe run before writing this module (moto 5.2.5
in server mode, the test double) showed that it honours both ``If-Match`` and ``If-None-Match`` on
``PutObject`` (412 ``PreconditionFailed``; ``If-Match`` on a missing key: 404 ``NoSuchKey``, as on
AWS), as AWS S3 does (another S3-compatible store must too: check it before pointing a home at
it). A lock object would need the same primitive to be taken safely, and would add a lock that a
killed publisher leaves behind. ``ObjectLease.release`` also sends ``If-Match`` on its DELETE; a
store that ignores it there could let a holder that stalled past ``ttl_s`` delete its successor's
lease on release. (moto checks a condition and stores the object in two steps, so truly
simultaneous conditional PUTs can both pass there; the tests make that step atomic, as it is on
S3: see ``tests/support/s3.py``.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from qarm_core.errors import StorageError
from qarm_core.lease import BusyError, LeaseInfo, LeaseLost, pid_alive
from qarm_core.storage import fsync_dir, fsync_file

if TYPE_CHECKING:  # typing only: s3fs is imported when an ObjectHome is made
    from s3fs import S3FileSystem

CURRENT = "CURRENT"
MANIFEST = "manifest.json"
SNAPSHOTS = "snapshots"
LEASE = "LEASE"
# Checked in this order: the S3-specific variable wins, as in botocore's own configuration.
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# Orphan prefixes (killed or losing publishers) younger than this may still be written by a live
# publisher, so prune leaves them; the local home waits an hour for its staging folders.
DEFAULT_ORPHAN_AGE_S = 24 * 3600.0
# S3 error codes of a failed precondition: 412, 404 for If-Match on a key that is gone, and 409
# which S3 answers when two conditional writes of one key overlap (the caller re-reads and decides).
_CONDITION_FAILED = frozenset({"PreconditionFailed", "412", "NoSuchKey", "404",
                               "ConditionalRequestConflict", "409"})
_SNAPSHOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
_TMP_OWNER = re.compile(r"\.tmp-([A-Za-z0-9_]+)_(\d+)\.[0-9a-f]{8}$")

log = logging.getLogger(__name__)


class PublishConflict(StorageError):
    """Another publisher switched CURRENT first: this publish lost the race and CURRENT was left as
    the other publisher set it. ``found`` is the snapshot id CURRENT names now."""

    def __init__(self, url: str, snapshot_id: str, expected: str | None, found: str | None, uploaded: bool):
        self.snapshot_id, self.expected, self.found, self.uploaded = snapshot_id, expected, found, uploaded
        left = (f"the uploaded snapshot {url}/{SNAPSHOTS}/{snapshot_id}/ stays as an unreferenced prefix "
                "(prune deletes it once older than orphan_age_s)" if uploaded
                else "nothing was uploaded")
        super().__init__(f"[stage=publish, dataset={CURRENT}] publishing snapshot {snapshot_id} to {url} lost a "
                         f"race: this run started from {_name(expected)} but another publisher switched CURRENT "
                         f"to {_name(found)} first; CURRENT was left as that publisher set it and {left}. "
                         "Rerun to learn from the new snapshot.")


def _name(snapshot_id: str | None) -> str:
    return f"snapshot {snapshot_id}" if snapshot_id is not None else "no snapshot"


def s3_error_code(exc: BaseException | None) -> str | None:
    """The S3 error code (``PreconditionFailed``, ``NoSuchKey``...) behind an s3fs or botocore error,
    found on it or the errors it was raised from (s3fs wraps botocore's ClientError in an OSError);
    None when there is none."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict):
            code = (resp.get("Error") or {}).get("Code")
            if code:
                return str(code)
        exc = exc.__cause__ or exc.__context__
    return None


def _condition_failed(exc: BaseException) -> bool:
    return isinstance(exc, FileExistsError) or s3_error_code(exc) in _CONDITION_FAILED


def _check_id(snapshot_id: str, stage: str) -> None:
    if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise StorageError(f"[stage={stage}, dataset={snapshot_id!r}] not a snapshot id: letters, digits, "
                           "'.', '_' and '-' only, starting with a letter or digit, at most 200 characters")


class ObjectHome:
    """A QARM_HOME at ``s3://bucket/prefix``: snapshots, CURRENT and the lease object.

    ``storage_options`` go to ``s3fs.S3FileSystem`` (e.g. ``{"key": ..., "secret": ...}``,
    ``{"config_kwargs": {"read_timeout": 20}}``, or ``{"skip_instance_cache": True}`` for a client
    of its own); ``max_concurrency`` bounds the files uploaded or downloaded at once. Raises
    StorageError for a URL that is not ``s3://bucket[/prefix]``.
    """

    def __init__(self, url: str, endpoint_url: str | None = None, storage_options: dict[str, Any] | None = None,
                 max_concurrency: int = 8):
        m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[^?#]*)?", url.strip())
        if m is None:
            raise StorageError(f"[stage=home, dataset={CURRENT}] {url!r} is not an object-store home: expected "
                               "s3://<bucket>[/<prefix>] (bucket: 3-63 lowercase letters, digits, '.', '-')")
        self.bucket = m.group(1)
        parts = [p for p in (m.group(2) or "").split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise StorageError(f"[stage=home, dataset={CURRENT}] {url!r}: '.' and '..' are not allowed in the prefix")
        self.prefix = "/".join(parts)
        self.url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint_url = endpoint_url or next((os.environ[v] for v in ENDPOINT_ENV if os.environ.get(v)), None)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency

        import s3fs  # here, not at module import: s3fs pulls in aiobotocore

        opts = dict(storage_options or {})
        if self.endpoint_url:
            opts.setdefault("endpoint_url", self.endpoint_url)
        # No listing cache: several writers share this store, and a cached listing could hide a
        # snapshot written by another process. fsspec's instance cache stays on: homes with the same
        # options share one client (making one costs ~0.2 s), so making an ObjectHome is cheap.
        opts.setdefault("use_listings_cache", False)
        self.fs: S3FileSystem = s3fs.S3FileSystem(**opts)

    def __repr__(self) -> str:
        return f"ObjectHome({self.url!r}, endpoint_url={self.endpoint_url!r})"

    # ------------------------------------------------------------ keys and raw object access
    def key(self, rel: str) -> str:
        """The object key of ``rel`` (a path relative to the home)."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def path(self, rel: str) -> str:
        """The s3fs path (``bucket/key``) of ``rel``."""
        return f"{self.bucket}/{self.key(rel)}"

    def _sync(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, fn, *args)

    def get_object(self, rel: str) -> tuple[bytes, str] | None:
        """(body, ETag) of the object ``rel``, read in one GET so that the ETag is that body's
        version (a later conditional write then replaces exactly what was read); None if absent."""
        async def go() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key(rel))
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            return self._sync(go)
        except FileNotFoundError as exc:
            if s3_error_code(exc) == "NoSuchBucket":
                raise StorageError(f"[stage=home, dataset={rel}] bucket {self.bucket} does not exist at "
                                   f"{self.endpoint_url or 'AWS S3'}; create it first") from None
            return None

    def put_object(self, rel: str, body: bytes, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write the object ``rel``; with ``if_match`` only if it still has that ETag, with
        ``if_none_match`` only if it does not exist. Returns the new ETag; raises the s3fs error
        (``_condition_failed`` tells a failed condition) otherwise."""
        cond: dict[str, str] = {}
        if if_match is not None:
            cond["IfMatch"] = if_match
        if if_none_match:
            cond["IfNoneMatch"] = "*"
        resp = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key(rel), Body=body,
                               ContentType="application/json", **cond)
        return resp["ETag"]

    def delete_object(self, rel: str, if_match: str | None = None) -> None:
        """Delete the object ``rel`` (only if it still has ETag ``if_match``, when given); raises the
        s3fs error otherwise."""
        cond = {"IfMatch": if_match} if if_match is not None else {}
        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key(rel), **cond)

    # ------------------------------------------------------------ plain files (shard scratch)
    def upload_folder(self, folder: str | os.PathLike, rel: str) -> int:
        """Copy every file under ``folder`` to ``rel/<its relative path>``; returns how many."""
        src = Path(folder)
        files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        self._transfer([(self.fs._put_file, str(src / f), self.path(f"{rel}/{f}"), f) for f in files])
        return len(files)

    def upload_file(self, path: str | os.PathLike, rel: str) -> None:
        """Store the file ``path`` as ``rel`` (one PUT: the object is whole or absent)."""
        self._transfer([(self.fs._put_file, str(path), self.path(rel), rel)])

    def download(self, rel: str, target: str | os.PathLike, folder: bool,
                 check: Callable[[Path], None] | None = None) -> Path:
        """A local copy of the object ``rel`` (``folder=False``) or of every object under ``rel/``:
        downloaded to a temporary name beside ``target``, passed to ``check`` (which raises to
        refuse it) and renamed into place, so ``target`` is complete (and checked) or absent.
        Raises StorageError if there is nothing at ``rel``."""
        dest = Path(target)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{_HOST}_{os.getpid()}.{uuid.uuid4().hex[:8]}"
        base = self.path(rel) + ("/" if folder else "")
        try:
            if folder:
                rels = sorted(p[len(base):] for p, info in self.fs.find(base, detail=True).items()
                              if info.get("type") != "directory" and p.startswith(base))
                if not rels:
                    raise StorageError(f"[stage=scratch, dataset={rel}] nothing under {self.url}/{rel}/")
                for d in {(tmp / r).parent for r in rels}:
                    d.mkdir(parents=True, exist_ok=True)
                self._transfer([(self.fs._get_file, base + r, str(tmp / r), r) for r in rels])
            else:
                try:
                    self._transfer([(self.fs._get_file, base, str(tmp), rel)])
                except FileNotFoundError:
                    raise StorageError(f"[stage=scratch, dataset={rel}] {self.url}/{rel} does not exist") from None
            if check is not None:
                check(tmp)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.exists():
                    raise
                # another process of this host fetched the same object first: its copy is as good
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
        return dest

    def delete_prefix(self, rel: str, older_than_s: float | None = None) -> int:
        """Delete every object under ``rel/`` (only those last written more than ``older_than_s``
        seconds ago, when given); returns how many."""
        base = self.path(rel) + "/"
        cutoff = None if older_than_s is None else time.time() - older_than_s
        keys = [p for p, info in self.fs.find(base, detail=True).items() if info.get("type") != "directory"
                and (cutoff is None or _modified(info) < cutoff)]
        if keys:
            self.fs.rm(keys)
        return len(keys)

    # ------------------------------------------------------------ CURRENT
    def _read_current(self, stage: str = "read") -> tuple[str | None, str | None]:
        """(snapshot id CURRENT names, CURRENT's ETag), (None, None) before the first publish."""
        got = self.get_object(CURRENT)
        if got is None:
            return None, None
        body, etag = got
        try:
            return str(json.loads(body)["snapshot_id"]), etag
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"[stage={stage}, dataset={CURRENT}] {self.url}/{CURRENT} is unreadable ({exc!r}); "
                               "it should be JSON with a snapshot_id") from None

    def current(self) -> str | None:
        """The snapshot id CURRENT names, None before the first publish; StorageError if CURRENT is
        unreadable."""
        return self._read_current()[0]

    # ------------------------------------------------------------ snapshots
    def manifest(self, snapshot_id: str) -> dict:
        """The manifest of a complete snapshot; StorageError if it has none (absent, pruned, or its
        publisher was killed before the manifest)."""
        _check_id(snapshot_id, "read")
        got = self.get_object(f"{SNAPSHOTS}/{snapshot_id}/{MANIFEST}")
        if got is None:
            raise StorageError(f"[stage=read, dataset={snapshot_id}] snapshot {snapshot_id} not found under "
                               f"{self.url}/{SNAPSHOTS}/ (no {MANIFEST}: never published, incomplete or pruned)")
        try:
            return json.loads(got[0])
        except ValueError as exc:
            raise StorageError(f"[stage=read, dataset={snapshot_id}] {self.url}/{SNAPSHOTS}/{snapshot_id}/{MANIFEST} "
                               f"is not JSON: {exc}") from None

    def _scan(self) -> dict[str, dict[str, Any]]:
        """Every prefix under ``snapshots/``: id -> {"keys": [relative paths], "complete": has a
        manifest, "newest": newest LastModified (epoch s)}. One paginated LIST of all keys."""
        base = self.path(SNAPSHOTS) + "/"
        found: dict[str, dict[str, Any]] = {}
        for p, info in self.fs.find(base, detail=True).items():
            if info.get("type") == "directory" or not p.startswith(base):
                continue
            sid, _, rest = p[len(base):].partition("/")
            if not rest:
                continue
            entry = found.setdefault(sid, {"keys": [], "complete": False, "newest": 0.0})
            entry["keys"].append(rest)
            entry["complete"] |= rest == MANIFEST
            entry["newest"] = max(entry["newest"], _modified(info))
        return found

    def list_snapshots(self) -> list[str]:
        """Ids of the complete snapshots (those with a manifest), oldest first."""
        return sorted(sid for sid, e in self._scan().items() if e["complete"])

    def publish(self, local_snapshot_dir: str | os.PathLike, snapshot_id: str, expected_current: str | None,
                on_uploaded: Callable[[str], None] | None = None) -> str:
        """Upload the complete local snapshot folder ``local_snapshot_dir`` (as ``Storage`` builds it:
        files in subfolders and ``manifest.json``) to ``snapshots/<snapshot_id>/``, manifest last,
        then point CURRENT at it, only if CURRENT still names ``expected_current`` (None: no
        snapshot yet). ``on_uploaded(relative_path)`` is called on this thread after each data file
        is stored (progress; whatever it raises stops the upload before the manifest, like a kill).
        Returns ``snapshot_id``.

        Raises PublishConflict when CURRENT names another snapshot, before the upload (nothing is
        uploaded) or at the switch (another publisher won the race); StorageError when the folder is
        not a complete snapshot or the id is already published (snapshots are immutable).
        """
        _check_id(snapshot_id, "publish")
        src = Path(local_snapshot_dir)
        manifest_file = src / MANIFEST
        if not manifest_file.is_file():
            raise StorageError(f"[stage=publish, dataset={snapshot_id}] {src} has no {MANIFEST}: only a complete "
                               "local snapshot is published")
        try:
            manifest = json.loads(manifest_file.read_bytes())
        except ValueError as exc:
            raise StorageError(f"[stage=publish, dataset={snapshot_id}] {manifest_file} is not JSON: {exc}") from None
        if manifest.get("snapshot_id", snapshot_id) != snapshot_id:
            raise StorageError(f"[stage=publish, dataset={snapshot_id}] {manifest_file} names snapshot "
                               f"{manifest['snapshot_id']}, not {snapshot_id}")
        files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        files.remove(MANIFEST)
        missing = sorted({f"{name}/{f}" for name, d in (manifest.get("datasets") or {}).items()
                          for f in d.get("files", ())} - set(files))
        if missing:
            raise StorageError(f"[stage=publish, dataset={snapshot_id}] {src} lacks {len(missing)} file(s) its "
                               f"manifest lists, e.g. {missing[:3]}")

        # Checked before uploading too: a run that cannot win should not upload a snapshot first.
        now_id, _ = self._read_current("publish")
        if now_id != expected_current:
            raise PublishConflict(self.url, snapshot_id, expected_current, now_id, uploaded=False)
        if self.fs.exists(self.path(f"{SNAPSHOTS}/{snapshot_id}/{MANIFEST}")):
            raise StorageError(f"[stage=publish, dataset={snapshot_id}] {self.url}/{SNAPSHOTS}/{snapshot_id}/ is "
                               "already a published snapshot; snapshots are immutable: publish under a new id")

        prefix = f"{SNAPSHOTS}/{snapshot_id}"
        self._transfer([(self.fs._put_file, str(src / f), self.path(f"{prefix}/{f}"), f) for f in files],
                       on_uploaded)
        # The manifest only after every data file is acknowledged: it marks the snapshot complete.
        self.fs.put_file(str(manifest_file), self.path(f"{prefix}/{MANIFEST}"))
        self._switch_current(snapshot_id, expected_current)
        return snapshot_id

    def _transfer(self, jobs: list[tuple[Callable[[str, str], Awaitable[Any]], str, str, str]],
                  on_done: Callable[[str], None] | None = None) -> None:
        """Run the copies ``(copy, source, destination, name)`` concurrently (``max_concurrency`` at a
        time) on fsspec's IO loop and call ``on_done(name)`` after each, here, on the caller's
        thread. Anything raised here (the hook, a signal such as KeyboardInterrupt) or by a copy
        cancels the copies still running and waits for them to stop before it propagates: nothing
        is written after this returns or raises, and fsspec's shared loop never sees the caller's
        exceptions (a BaseException raised on it would stop it for every fsspec user in the process).
        """
        import queue

        finished: queue.SimpleQueue[str | None] = queue.SimpleQueue()   # finished names, then None
        stopped = threading.Event()

        async def run_all() -> None:
            sem = asyncio.Semaphore(self.max_concurrency)

            async def one(copy: Callable[[str, str], Awaitable[Any]], source: str, dest: str, name: str) -> None:
                async with sem:
                    await copy(source, dest)
                finished.put(name)

            try:
                await _gather_or_cancel([one(*job) for job in jobs])
            finally:
                stopped.set()

        future = asyncio.run_coroutine_threadsafe(run_all(), self.fs.loop)
        future.add_done_callback(lambda _: finished.put(None))
        try:
            while True:
                try:
                    name = finished.get(timeout=1.0)   # a timeout so that signals are handled promptly
                except queue.Empty:
                    continue
                if name is None:
                    break
                if on_done is not None:
                    on_done(name)
            future.result()
        except BaseException:
            future.cancel()
            stopped.wait(30)
            raise

    def _switch_current(self, snapshot_id: str, expected: str | None) -> None:
        body = json.dumps({"snapshot_id": snapshot_id,
                           "updated_at": datetime.now(timezone.utc).isoformat()}, indent=2, sort_keys=True).encode()
        for _ in range(3):
            now_id, etag = self._read_current("publish")
            if now_id == snapshot_id:
                return                       # a retried PUT whose first attempt landed: this run won
            if now_id != expected:
                raise PublishConflict(self.url, snapshot_id, expected, now_id, uploaded=True)
            try:
                if etag is None:
                    self.put_object(CURRENT, body, if_none_match=True)
                else:
                    self.put_object(CURRENT, body, if_match=etag)
                return
            except Exception as exc:         # noqa: BLE001 -- filtered: only a failed condition is retried
                if not _condition_failed(exc):
                    raise
                # Lost, or our own retried write, or a 409 overlap: the re-read above decides.
        raise StorageError(f"[stage=publish, dataset={CURRENT}] {self.url}/{CURRENT} kept changing under this "
                           f"publish of {snapshot_id} (3 conditional writes refused) but still names "
                           f"{_name(expected)}; CURRENT is unchanged by this run")

    def fetch(self, snapshot_id: str, cache_dir: str | os.PathLike, verify: bool = True) -> Path:
        """A local copy of a complete snapshot: ``<cache_dir>/<snapshot_id>``, downloaded unless
        already there (snapshots are immutable, so a cached copy is always valid). The download goes
        to a temporary folder renamed into place, so a killed download never leaves a partial copy;
        ``verify`` checks every dataset's fingerprint against the manifest. Returns the folder.

        Raises StorageError if the snapshot is not complete in the store, a file disappears while
        downloading (pruned meanwhile) or a fingerprint does not match.
        """
        _check_id(snapshot_id, "fetch")
        cache = Path(cache_dir)
        target = cache / snapshot_id
        if target.is_dir():
            return target
        manifest = self.manifest(snapshot_id)
        cache.mkdir(parents=True, exist_ok=True)
        self._remove_dead_downloads(cache, snapshot_id)
        base = self.path(f"{SNAPSHOTS}/{snapshot_id}") + "/"
        rels = sorted(p[len(base):] for p, info in self.fs.find(base, detail=True).items()
                      if info.get("type") != "directory" and p.startswith(base))
        if MANIFEST not in rels:
            raise StorageError(f"[stage=fetch, dataset={snapshot_id}] snapshot {snapshot_id} disappeared from "
                               f"{self.url}/{SNAPSHOTS}/ while fetching it (pruned meanwhile?)")
        tmp = cache / f".{snapshot_id}.tmp-{_HOST}_{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            try:
                for r in {(tmp / r).parent for r in rels}:
                    r.mkdir(parents=True, exist_ok=True)
                self._transfer([(self.fs._get_file, base + r, str(tmp / r), r) for r in rels])
            except FileNotFoundError as exc:
                raise StorageError(f"[stage=fetch, dataset={snapshot_id}] a file of {base} disappeared while "
                                   f"downloading (pruned meanwhile?): {exc}") from None
            if verify:
                self._verify(snapshot_id, tmp, manifest)
            for r in rels:
                fsync_file(tmp / r)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
                # a concurrent fetch of the same snapshot finished first: its copy is as good
            fsync_dir(cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @staticmethod
    def _verify(snapshot_id: str, folder: Path, manifest: dict) -> None:
        for name, d in sorted((manifest.get("datasets") or {}).items()):
            check_downloaded_dataset("fetch", snapshot_id, name, d, folder / name)

    @staticmethod
    def _remove_dead_downloads(cache: Path, snapshot_id: str) -> None:
        """Remove temporary folders of this snapshot's downloads whose process is gone from this
        host (what a killed ``fetch`` leaves)."""
        for p in cache.glob(f".{snapshot_id}.tmp-*"):
            m = _TMP_OWNER.search(p.name)
            if m and m.group(1) == _HOST and not pid_alive(int(m.group(2))):
                shutil.rmtree(p, ignore_errors=True)

    def prune(self, retention: int, orphan_age_s: float = DEFAULT_ORPHAN_AGE_S) -> list[str]:
        """Delete the snapshots older than CURRENT's beyond ``retention`` (which counts CURRENT's),
        and the prefixes nothing refers to (no manifest, or newer than CURRENT's: killed or losing
        publishers) once their newest object is older than ``orphan_age_s``. Never deletes the
        snapshot CURRENT names. Returns the ids deleted, sorted.
        """
        if retention < 1:
            raise ValueError(f"retention must be at least 1 (the current snapshot), got {retention}")
        cur = self.current()
        scan = self._scan()
        history = sorted(s for s, e in scan.items() if e["complete"] and cur is not None and s < cur)
        doomed = set(history[:max(len(history) - (retention - 1), 0)])
        cutoff = time.time() - orphan_age_s
        for sid, e in scan.items():
            unreferenced = not e["complete"] or cur is None or sid > cur
            if sid != cur and unreferenced and e["newest"] < cutoff:
                doomed.add(sid)
        doomed.discard(cur)  # type: ignore[arg-type]
        if not doomed:
            return []
        # Manifests first: a prune cut off halfway leaves orphans, never a snapshot that looks
        # complete with files missing.
        manifests = [self.path(f"{SNAPSHOTS}/{s}/{MANIFEST}") for s in sorted(doomed) if scan[s]["complete"]]
        if manifests:
            self.fs.rm(manifests)
        rest = [self.path(f"{SNAPSHOTS}/{s}/{k}") for s in sorted(doomed) for k in scan[s]["keys"] if k != MANIFEST]
        if rest:
            self.fs.rm(rest)
        return sorted(doomed)


def _modified(info: dict[str, Any]) -> float:
    """An object's LastModified (epoch s) from a listing; an object of unknown age counts as new
    (now): what prunes and sweeps must never delete what they cannot date."""
    modified = info.get("LastModified")
    return modified.timestamp() if isinstance(modified, datetime) else time.time()


async def _gather_or_cancel(coros: list[Awaitable[None]]) -> None:
    """Run ``coros`` concurrently; on the first failure cancel the others, wait for them, and raise
    that failure (not an ExceptionGroup)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class ObjectLease:
    """The refresh lease of an ``ObjectHome``: the object ``LEASE``; semantics and errors of
    ``qarm_core.lease.Lease`` (BusyError naming the holder, LeaseLost, ``taken_over``), conditional
    writes in place of the flock. Use ``acquire``/``release`` or as a context manager.
    """

    def __init__(self, home: ObjectHome, purpose: str, ttl_s: float = 120.0, heartbeat_s: float = 20.0,
                 clock: Callable[[], float] = time.time):
        if heartbeat_s >= ttl_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be shorter than ttl_s ({ttl_s})")
        self.home, self.purpose, self.ttl_s, self.heartbeat_s, self.clock = home, purpose, ttl_s, heartbeat_s, clock
        self.owner = uuid.uuid4().hex
        self.taken_over: LeaseInfo | None = None     # the stale lease this run replaced, if any
        self._info: LeaseInfo | None = None
        self._etag: str | None = None                # ETag of our last write of LEASE
        self._mutex = threading.Lock()               # one write of LEASE at a time from this process
        self._stop = threading.Event()
        self._lost = False
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"{self.home.url}/{LEASE}"

    def _read(self) -> tuple[LeaseInfo | None, str | None]:
        got = self.home.get_object(LEASE)
        if got is None:
            return None, None
        try:
            return LeaseInfo(**json.loads(got[0])), got[1]
        except (ValueError, TypeError):   # a torn or foreign object: treat as stale
            return LeaseInfo("?", -1, "?", "unreadable lease object", 0.0, 0.0), got[1]

    def _is_stale(self, info: LeaseInfo, now: float) -> bool:
        if now - info.heartbeat_at > self.ttl_s:
            return True
        return info.host == socket.gethostname() and not pid_alive(info.pid)

    def holder(self) -> LeaseInfo | None:
        """The current lease, whoever holds it (None when free or stale)."""
        info, _ = self._read()
        return None if info is None or self._is_stale(info, self.clock()) else info

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> "ObjectLease":
        """Take the lease (create LEASE, or take over a stale one), waiting up to ``wait_s`` seconds
        for a live holder to finish. Returns self; raises BusyError naming the holder when it is
        still held then."""
        deadline = time.monotonic() + wait_s
        while True:
            now = self.clock()
            info, etag = self._read()
            if info is None or self._is_stale(info, now):
                mine = LeaseInfo(self.owner, os.getpid(), socket.gethostname(), self.purpose, now, now)
                new_etag = self._try_write(mine, etag)
                if new_etag is not None:
                    self.taken_over, self._info, self._etag, self._lost = info, mine, new_etag, False
                    break
                continue                      # another run got it first: re-read (busy now, most likely)
            if time.monotonic() >= deadline:
                raise BusyError(f"{self.home.url} is in use by another {info.describe(now)}; this run stops before "
                                "doing anything. Wait for it, or set flow.on_busy: wait to queue behind it.")
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="qarm-object-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _try_write(self, info: LeaseInfo, etag: str | None) -> str | None:
        """Write ``info`` as LEASE if LEASE is still the version ``etag`` (None: absent). Returns the
        new ETag, or None if the condition failed and LEASE is not ours."""
        body = json.dumps(asdict(info)).encode()
        try:
            if etag is None:
                return self.home.put_object(LEASE, body, if_none_match=True)
            return self.home.put_object(LEASE, body, if_match=etag)
        except Exception as exc:              # noqa: BLE001 -- filtered: only a failed condition is an answer
            if not _condition_failed(exc):
                raise
        # A retried PUT whose first attempt landed fails against itself: whose LEASE is it now?
        now, now_etag = self._read()
        return now_etag if now is not None and now == info else None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except LeaseLost as exc:
                log.error("%s", exc)          # check() raises it again before anything is published
                return
            except Exception as exc:          # noqa: BLE001 -- a network blip: the next beat retries
                log.warning("heartbeat of %s failed, retrying in %.0f s: %r", self.where, self.heartbeat_s, exc)

    def _lost_error(self) -> LeaseLost:
        return LeaseLost(f"the refresh lease of {self.home.url} was taken over by another run while this one "
                         f"stalled for more than {self.ttl_s:.0f} s; nothing is published")

    def heartbeat(self) -> None:
        """Renew the lease: rewrite LEASE with a new heartbeat, only if it is still our last write
        (If-Match our ETag). The thread does this every ``heartbeat_s``. Raises LeaseLost (and
        stays lost) if another run took it over; the store's error if it cannot be reached."""
        with self._mutex:
            self._rewrite(heartbeat_at=self.clock())

    renew = heartbeat                         # the name qarm_core.lease.Lease uses

    def check(self) -> None:
        """Raise LeaseLost if another run took this lease over (call before publishing). It renews
        the lease with a conditional write: a write that succeeds proves that no one took it over,
        and that it stays ours for another ``ttl_s``."""
        self.heartbeat()

    def annotate(self, run_id: str, flow_run_id: str = "") -> None:
        """Record the holder's MLflow run id and Prefect flow run id in the lease (so that a later run
        can close them if this one dies). Raises LeaseLost if the lease is no longer ours."""
        with self._mutex:
            self._rewrite(run_id=run_id, flow_run_id=flow_run_id)

    def _rewrite(self, **changes: Any) -> None:
        """Write our lease with ``changes`` if LEASE is still our last write (call under the mutex);
        LeaseLost (and lost for good) if it is not."""
        if self._lost:
            raise self._lost_error()
        if self._info is None:
            raise LeaseLost(f"the refresh lease of {self.home.url} is not held by this run (never acquired, "
                            "or released)")
        info = LeaseInfo(**{**asdict(self._info), **changes})
        etag = self._try_write(info, self._etag)
        if etag is None:
            self._lost = True
            raise self._lost_error()
        self._info, self._etag = info, etag

    def release(self) -> None:
        """Stop the heartbeat and delete LEASE if it is still ours (a conditional DELETE, If-Match our
        ETag: a lease taken over meanwhile stays its new holder's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._mutex:
            if self._info is not None and not self._lost and self._etag is not None:
                try:
                    self.home.delete_object(LEASE, if_match=self._etag)
                except Exception as exc:      # noqa: BLE001 -- filtered: a failed condition means not ours
                    if not _condition_failed(exc):
                        raise
            self._info, self._etag = None, None

    def __enter__(self) -> "ObjectLease":
        # ``with lease.acquire(wait_s=...)`` as well as ``with lease``: a held lease is not taken twice.
        return self if self._info is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_downloaded_dataset(stage: str, snapshot_id: str, dataset: str, entry: dict, folder: Path) -> None:
    """Refuse a downloaded dataset of a snapshot (``folder`` holds its files) when a file its
    manifest ``entry`` lists is absent or the files do not hash to the entry's fingerprint."""
    from qarm_core.storage import hash_files  # here: storage imports pyarrow

    files = [folder / f for f in entry.get("files", ())]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise StorageError(f"[stage={stage}, dataset={dataset}] snapshot {snapshot_id} lacks {absent[:3]} "
                           "that its manifest lists")
    if "fingerprint" in entry and hash_files(files) != entry["fingerprint"]:
        raise StorageError(f"[stage={stage}, dataset={dataset}] the downloaded files of snapshot {snapshot_id} "
                           f"do not match the manifest's fingerprint {entry['fingerprint']}")
