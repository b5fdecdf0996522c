"""Where the LLM stages' shards run: in this process (``local``, the default) or on a Dask cluster.

A sharded stage cuts its input into shards by a stable key (catalog embedding: parts of the
id-sorted catalog, ``chunk_rows`` items each), describes each shard as a small picklable job and
hands the jobs to a ``ShardRunner``. Each job writes its own output under a name fixed by its shard
(temporary name, then rename), so a shard run twice (a lost worker's shard retried) overwrites
itself with the same bytes instead of adding rows; the stage commits its output only once every
shard's file is there. A shard's result depends only on its job, never on which worker ran it or
alongside what, so a sharded run writes what the local run writes.

The library defines the contract and the in-process runner; the Dask runner lives in the Prefect
layer (``tasks/executor.py``: Prefect's DaskTaskRunner, one task run per shard, with retries).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, Protocol, Sequence, TypeVar

from pydantic import Field

from qarm_core.base import Strict

if TYPE_CHECKING:
    from qarm_core.scratch import ObjectScratch

J = TypeVar("J")
R = TypeVar("R")


class ExecutorConfig(Strict):
    """``executor:`` in the pipeline config. Not part of any cache key: where a shard ran never
    changes what it wrote."""

    kind: Literal["local", "dask"] = "local"
    # A running Dask scheduler, e.g. tcp://10.0.0.5:8786; empty: start a local cluster of
    # ``workers`` processes for the run (one model replica each) and stop it afterwards.
    address: str = ""
    workers: int = Field(2, ge=1)
    # CPU threads of one worker (torch's intra-op threads in its model); 1 worker per core is the
    # fastest layout for the small models on a CPU box (benchmarks/bench_executor.py).
    threads_per_worker: int = Field(1, ge=1)
    # Retries of one shard's task run (a lost worker's shards are also rescheduled by Dask itself).
    shard_retries: int = Field(2, ge=0)
    # With kind dask, stages that do not depend on each other run at the same time (the baselines'
    # embeddings beside fine-tuning), their shards sharing the cluster. Never with kind local: there
    # the stages would share this process's cores (no gain) and its torch state (thread count,
    # global random generator) with an in-process training run.
    overlap_stages: bool = True
    # Where a sharded stage's jobs find their files (the catalog, a model that lives in the home,
    # their outputs): "shared" = the driver's own paths (workers on this host or on a shared
    # filesystem); "object_store" = keys of the s3:// home's store, fetched by each worker
    # (qarm_core.scratch), for workers that share no filesystem with the driver; "auto" = the store
    # for a remote cluster (``address``) with an s3:// home, else shared.
    scratch: Literal["auto", "shared", "object_store"] = "auto"
    # Environment variables of the workers of a local cluster that a run starts (e.g. their own
    # QARM_LOCAL_ROOT or HF_HOME); the workers of ``address`` get theirs from whoever started them.
    worker_env: dict[str, str] = Field(default_factory=dict)

    def scratch_on_store(self, home: str) -> bool:
        """Whether shard jobs pass their files through the home's object store (``scratch``)."""
        from qarm_core.storage import is_remote_home

        if self.scratch == "auto":
            return self.kind == "dask" and bool(self.address) and is_remote_home(home)
        return self.kind == "dask" and self.scratch == "object_store"

    @property
    def stages_overlap(self) -> bool:
        """Whether a flow run submits independent stages side by side (see ``overlap_stages``)."""
        return self.kind == "dask" and self.overlap_stages


class ShardRunner(Protocol):
    """Runs ``fn`` on every job and returns the results in job order (or raises the first error)."""

    workers: int
    threads: int | None           # CPU threads of one worker's model (None: the process's setting)
    remote: bool                  # jobs run in other processes (so they carry paths and config, not objects)
    scratch: "ObjectScratch | None"   # jobs reach their files through the store (else the driver's paths)

    def run(self, fn: Callable[[J], R], jobs: Sequence[J], label: str) -> list[R]: ...


class LocalShards:
    """Every shard in this process, one after another (what ``executor.kind: local`` means)."""

    workers = 1
    threads = None
    remote = False
    scratch = None

    def run(self, fn: Callable[[J], R], jobs: Sequence[J], label: str) -> list[R]:
        return [fn(job) for job in jobs]
