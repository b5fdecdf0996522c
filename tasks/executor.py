"""The shard runners behind ``executor:`` (``qarm_core.executor``): ``local`` runs a stage's shards in
the task's own process; ``dask`` runs each shard as a Prefect task run on a Dask cluster through
Prefect's ``DaskTaskRunner`` (prefect-dask), so every shard is visible in the Prefect UI with its
own logs, state and retries.

Why Dask and not Ray: the shards are coarse (tens of thousands of items each) and need no shuffle
or object store, just "run this job on a worker that keeps a model loaded", which a Dask worker
process does by caching the model (``qarm_core.embed.embed._worker_embedder``). Dask is a few MB of
pure Python that starts a 2-worker local cluster in ~3 s and runs the same on a laptop, a VM pool
(``dask scheduler`` / ``dask worker``), Kubernetes or Slurm; Ray's raylet, GCS and object store
cost ~10 s and ~1 GB to start on this 2-core CI box, a price paid by every test of this path.

Workers must see the same QARM_HOME (a shared filesystem) and report to a Prefect API: a local
cluster started here is given this run's API address (the ephemeral server of a plain
``qarm refresh`` included); workers of an ``executor.address`` cluster need PREFECT_API_URL set to
a Prefect server they can reach.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence, TypeVar

from prefect import get_run_logger, task

from qarm_core.config import PipelineConfig
from qarm_core.executor import ExecutorConfig, LocalShards, ShardRunner
from qarm_core.progress import Progress
from tasks.common import TASK_DEFAULTS, route_core_logs

J = TypeVar("J")
R = TypeVar("R")


@task(name="shard", task_run_name="{label}-{index:05d}", **TASK_DEFAULTS)
def run_shard(fn: Callable[[Any], Any], job: Any, label: str, index: int) -> Any:
    """One shard of a sharded stage, on whichever worker Dask chose. Its output file is named by
    its shard, so a retry (or a rerun after a lost worker) rewrites it instead of adding to it."""
    route_core_logs()
    return fn(job)


class DaskShards:
    """A stage's shards as Prefect task runs on a Dask cluster (``executor.kind: dask``)."""

    def __init__(self, runner: Any, cfg: ExecutorConfig, workers: int):
        self.runner, self.cfg, self.workers = runner, cfg, workers

    def run(self, fn: Callable[[J], R], jobs: Sequence[J], label: str) -> list[R]:
        from prefect.futures import as_completed

        shard = run_shard.with_options(retries=self.cfg.shard_retries)
        futures = [self.runner.submit(shard, {"fn": fn, "job": job, "label": label, "index": i})
                   for i, job in enumerate(jobs)]
        prog = Progress("executor", f"{label}: shards on {self.workers} Dask worker(s)", len(futures), "shards")
        for f in as_completed(futures):
            f.result()                       # the first failed shard (after its retries) fails the stage
            prog.advance(1)
        prog.finish()
        return [f.result() for f in futures]


def _api_url() -> str | None:
    """This run's Prefect API address, for workers of a cluster started here."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url) if client.api_url else None


@contextlib.contextmanager
def shard_runner(cfg: PipelineConfig) -> Iterator[ShardRunner]:
    """The runner ``cfg.executor`` asks for, started for the ``with`` block and stopped after it
    (a local cluster's worker processes end with it)."""
    ex = cfg.executor
    if ex.kind == "local":
        yield LocalShards()
        return
    from prefect_dask import DaskTaskRunner

    log = get_run_logger()
    if ex.address:
        runner = DaskTaskRunner(address=ex.address)
    else:
        env = {"OMP_NUM_THREADS": str(ex.threads_per_worker), "MKL_NUM_THREADS": str(ex.threads_per_worker)}
        url = os.environ.get("PREFECT_API_URL") or _api_url()
        if url:
            env["PREFECT_API_URL"] = url
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster",
                                cluster_kwargs={"n_workers": ex.workers, "threads_per_worker": 1,
                                                "processes": True, "dashboard_address": None, "env": env})
    with runner:
        n = len(runner.client.scheduler_info()["workers"]) if ex.address else ex.workers
        log.info("executor: dask, %d worker(s) at %s", n, ex.address or "a local cluster started for this stage")
        yield DaskShards(runner, ex, max(n, 1))
