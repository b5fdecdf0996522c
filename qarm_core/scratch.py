"""Shard scratch on the object store: how the jobs of a sharded stage reach their files when the
workers share no filesystem with the driver (``executor.scratch: object_store``; needs an ``s3://``
home).

With a shared filesystem (``executor.scratch: shared``) a job names the driver's own paths. Here it
names keys of the home's store instead, under ``work/scratch/<the stage's folder>/``:

* the driver uploads the job's inputs there before it submits the jobs: the id-sorted catalog and a
  model folder that lives in the home (a fine-tuned model in staging; an installed model, e.g. the
  SmolLM2 asset, is installed on every worker too and is not copied); published datasets are named
  by their snapshot key (``snapshots/<id>/<dataset>``), which the store already holds;
* a worker downloads what its job names into its own local root, once per host (``fetch``; later
  jobs find the copy; a snapshot's dataset alone, checked against the snapshot's manifest), writes
  its output there and uploads it under a key fixed by its shard (``hand_back``), so a retried shard
  overwrites the same object with the same bytes;
* the driver downloads the outputs into its output folder, checks them as it checks local ones,
  and deletes the stage's scratch prefix once it has them all (``collect``, ``clear``). A failed or
  killed run leaves its prefix; a rerun with the same inputs uses it again (same keys, same bytes)
  and ``sweep`` (run at publish) deletes scratch objects older than ``storage.work_ttl_hours``.

Objects are written whole or not at all (one PUT each), and a job starts only after the driver's
uploads returned, so a worker never reads half an input. A worker's copies are kept in
``<its local root>/cache/scratch`` and removed once unused for a day.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from qarm_core.storage import Storage, is_remote_home

if TYPE_CHECKING:
    from qarm_core.objectstore import ObjectHome

SCRATCH = "work/scratch"
# A worker's downloaded copies older than this are removed (a daily refresh makes new ones).
KEEP_COPIES_S = 24 * 3600.0


class ObjectScratch:
    """Scratch keys of the home ``home_url`` (an ``s3://`` URL). Picklable: a job carries the URL and
    the worker makes its own client."""

    def __init__(self, home_url: str):
        if not is_remote_home(home_url):
            raise ValueError(f"shard scratch on an object store needs an s3:// home, got {home_url!r}")
        self.home_url = str(home_url).rstrip("/")

    def __getstate__(self) -> dict:
        return {"home_url": self.home_url}

    def __setstate__(self, state: dict) -> None:
        self.home_url = state["home_url"]

    @cached_property
    def storage(self) -> Storage:
        """This process's view of the home: its local root and the store."""
        return Storage(self.home_url)

    @property
    def store(self) -> "ObjectHome":
        return self.storage.remote

    # ------------------------------------------------------------ driver side
    def key_for(self, folder: str | os.PathLike) -> str:
        """The scratch prefix of a stage's output folder (a folder under this host's local root)."""
        try:
            rel = Path(folder).resolve().relative_to(self.storage.home)
        except ValueError:
            raise ValueError(f"shard scratch: output folder {folder} is not under the home's local root "
                             f"{self.storage.home}") from None
        return f"{SCRATCH}/{rel.as_posix()}"

    def share_file(self, path: str | os.PathLike, key: str) -> str:
        self.store.upload_file(path, key)
        return key

    def share_folder(self, folder: str | os.PathLike, key: str) -> str:
        self.store.upload_folder(folder, key)
        return key

    def published_key(self, path: str | os.PathLike) -> str | None:
        """The store key of ``path`` when it is a dataset of a snapshot this host fetched from the
        store (``snapshots/<id>/<dataset>``), else None."""
        try:
            rel = Path(path).resolve().relative_to(self.storage.snapshots_dir)
        except ValueError:
            return None
        return f"snapshots/{rel.as_posix()}"

    def in_home(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` lives in this host's local root (so other hosts cannot see it)."""
        return Path(path).resolve().is_relative_to(self.storage.home)

    def collect(self, key: str, target: str | os.PathLike) -> bool:
        """Download the output ``key`` to ``target`` (complete or absent); False if no worker
        handed it back (the caller reports what is missing)."""
        if not self.store.fs.exists(self.store.path(key)):
            return False
        self.store.download(key, target, folder=False)
        return True

    def clear(self, key: str) -> None:
        """Delete the scratch prefix ``key`` and everything under it."""
        self.store.delete_prefix(key)

    def sweep(self, older_than_s: float) -> int:
        """Delete scratch objects last written more than ``older_than_s`` ago: what runs that died
        or failed left (a finished stage deletes its own prefix). Returns how many."""
        return self.store.delete_prefix(SCRATCH, older_than_s=older_than_s)

    # ------------------------------------------------------------ worker side
    @property
    def copies_dir(self) -> Path:
        return self.storage.cache_dir("scratch")

    def fetch(self, key: str, folder: bool) -> Path:
        """This host's copy of the object (or folder of objects) ``key``, downloaded once (later
        calls find it). A snapshot's dataset (``snapshots/<id>/<dataset>``) is downloaded alone and
        checked against the snapshot's manifest (its fingerprint)."""
        target = self.copies_dir / hashlib.sha256(key.encode()).hexdigest()[:16] / Path(key).name
        if target.exists():
            os.utime(target.parent)          # in use: the sweep of old copies leaves it
            return target
        self._remove_old_copies()
        check = None
        if key.startswith("snapshots/"):
            sid, dataset = key.split("/")[1:3]
            check = functools.partial(_check_dataset, self.store.manifest(sid), sid, dataset)
            folder = True
        self.store.download(key, target, folder=folder, check=check)
        return target

    def output_dir(self, key: str) -> Path:
        """A local folder of this process where it writes outputs before handing them back (one per
        process: a part that two processes of one host run at once never shares a file)."""
        out = self.copies_dir / "out" / hashlib.sha256(key.encode()).hexdigest()[:16] / str(os.getpid())
        out.mkdir(parents=True, exist_ok=True)
        return out

    def hand_back(self, path: str | os.PathLike, key: str) -> None:
        """Upload a worker's output file as ``key`` and remove the local file."""
        self.store.upload_file(path, key)
        Path(path).unlink()

    def _remove_old_copies(self) -> None:
        """Remove copies not used for ``KEEP_COPIES_S`` (another process of this host may be
        removing them too, or have just used one: both are fine)."""
        cutoff = time.time() - KEEP_COPIES_S
        try:
            entries = list(self.copies_dir.iterdir())
        except FileNotFoundError:
            return
        for p in entries:
            try:
                if p.name != "out" and p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass


def _check_dataset(manifest: dict, snapshot_id: str, dataset: str, folder: Path) -> None:
    """Refuse a downloaded snapshot dataset that its manifest does not name or whose files do not
    match the manifest's fingerprint."""
    from qarm_core.errors import StorageError
    from qarm_core.objectstore import check_downloaded_dataset

    try:
        entry = manifest["datasets"][dataset]
    except KeyError:
        raise StorageError(f"[stage=scratch, dataset={dataset}] snapshot {snapshot_id} has no dataset "
                           f"{dataset!r}") from None
    check_downloaded_dataset("scratch", snapshot_id, dataset, entry, folder)
