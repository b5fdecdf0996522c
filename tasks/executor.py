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

Workers must see the same QARM_HOME (a shared filesystem), or, with an s3:// home and
``executor.scratch`` on the store (the default for a remote cluster), only its object store
(``qarm_core.scratch``); and they report to a Prefect API: a local
cluster started here is given this run's API address (the ephemeral server of a plain
``qarm refresh`` included); workers of an ``executor.address`` cluster need PREFECT_API_URL set to
a Prefect server they can reach. On a GPU host, a local cluster gives worker i the GPU i mod n
alone (``local_cluster``): ``executor.workers`` = the GPU count is one model replica per GPU; the
workers of an ``executor.address`` cluster are started one per GPU by whoever runs them (e.g.
``CUDA_VISIBLE_DEVICES=3 dask worker --nworkers 1 --nthreads 1 ...``, or dask-cuda's ``dask cuda worker``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence, TypeVar

from prefect import get_run_logger, task

from qarm_core.config import PipelineConfig
from qarm_core.errors import raise_if_stopped
from qarm_core.executor import ExecutorConfig, LocalShards, ShardRunner
from qarm_core.progress import Progress
from qarm_core.scratch import SCRATCH, ObjectScratch
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

    def __init__(self, runner: Any, cfg: ExecutorConfig, workers: int, scratch: ObjectScratch | None = None):
        self.runner, self.cfg, self.workers, self.scratch = runner, cfg, workers, scratch
        self.threads = cfg.threads_per_worker
        self.remote = True

    def run(self, fn: Callable[[J], R], jobs: Sequence[J], label: str) -> list[R]:
        import queue

        shard = run_shard.with_options(retries=self.cfg.shard_retries)
        futures = [self.runner.submit(shard, {"fn": fn, "job": job, "label": label, "index": i})
                   for i, job in enumerate(jobs)]
        prog = Progress("executor", f"{label}: shards on {self.workers} Dask worker(s)", len(futures), "shards")
        finished: queue.SimpleQueue = queue.SimpleQueue()
        try:
            for f in futures:
                f.add_done_callback(finished.put)
            for _ in futures:
                # a second at a time: a stop signal is only recorded while this thread waits on a
                # lock (qarm_core.errors.interruptible_at), and a shard may run for minutes
                while True:
                    try:
                        f = finished.get(timeout=1.0)
                        break
                    except queue.Empty:
                        raise_if_stopped()
                f.result()                   # the first failed shard (after its retries) fails the stage
                prog.advance(1)
        except BaseException:
            for f in futures:                # the stage has failed: its queued shards need not run
                with contextlib.suppress(Exception):
                    f.wrapped_future.cancel()
            raise
        prog.finish()
        return [f.result() for f in futures]


def _api_url() -> str | None:
    """This run's Prefect API address, for workers of a cluster started here."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url) if client.api_url else None


def _local_cluster_kwargs(ex: ExecutorConfig) -> dict[str, Any]:
    """A local cluster of ``ex.workers`` processes, one task at a time each, whose models use
    ``ex.threads_per_worker`` threads and whose task runs report to this run's Prefect API."""
    env = {"OMP_NUM_THREADS": str(ex.threads_per_worker), "MKL_NUM_THREADS": str(ex.threads_per_worker),
           **ex.worker_env}
    url = os.environ.get("PREFECT_API_URL") or _api_url()
    if url:
        env["PREFECT_API_URL"] = url
    return {"n_workers": ex.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "env": env}


class Finished:
    """A task already run in the flow's thread, with the interface of the PrefectFuture it stands for."""

    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


def start(cfg: PipelineConfig, stage_task: Any, *args: Any) -> Any:
    """Run ``stage_task(*args)`` beside what the flow does next when its stages may overlap
    (``executor.stages_overlap``: a PrefectFuture, submitted to the flow's task runner), else now,
    before returning (a ``Finished``). Either way ``.result()`` gives its return value."""
    if cfg.executor.stages_overlap:
        return stage_task.submit(*args)
    return Finished(stage_task(*args))


# The address of the local cluster the running flow started (``flow_cluster``), which its stages share.
_FLOW_CLUSTER: dict[str, str] = {}


@contextlib.contextmanager
def local_cluster(ex: ExecutorConfig, gpus: Sequence[str] | None = None) -> Iterator[tuple[Any, str]]:
    """A local Dask cluster of ``ex.workers`` processes (``_local_cluster_kwargs``), stopped when
    the block ends; yields ``(cluster, layout)``, ``layout`` a phrase for the log. Where this host
    has GPUs (``devices.visible_gpus``; ``gpus`` names them instead), worker i sees GPU i mod n
    alone (``tasks.dask_plugins.PinGPU``): with ``executor.workers`` equal to the GPU count, one
    model replica per GPU."""
    from distributed import Client, LocalCluster

    from qarm_core.devices import visible_gpus

    gpus = visible_gpus() if gpus is None else [str(g) for g in gpus]
    with LocalCluster(**_local_cluster_kwargs(ex)) as cluster:
        layout = f"{ex.workers} worker(s) x {ex.threads_per_worker} thread(s)"
        if gpus:
            from tasks.dask_plugins import PinGPU

            with Client(cluster) as client:
                client.register_plugin(PinGPU(gpus))
            layout += ", worker i on GPU " + (gpus[0] if len(gpus) == 1 else f"[{', '.join(gpus)}][i mod {len(gpus)}]")
        yield cluster, layout


@contextlib.contextmanager
def flow_cluster(cfg: PipelineConfig) -> Iterator[None]:
    """For a flow run with ``executor.kind: dask`` and no ``executor.address``: one local cluster
    for the whole run, shared by its sharded stages (workers start and load their models once, not
    once per stage), stopped when the run ends. Otherwise nothing."""
    ex = cfg.executor
    if ex.kind != "dask" or ex.address:
        yield
        return
    with local_cluster(ex) as (cluster, layout):
        get_run_logger().info("executor: started a local Dask cluster (%s) at %s for this run", layout,
                              cluster.scheduler_address)
        _FLOW_CLUSTER["address"] = cluster.scheduler_address
        try:
            yield
        finally:
            _FLOW_CLUSTER.pop("address", None)


@contextlib.contextmanager
def shard_runner(cfg: PipelineConfig) -> Iterator[ShardRunner]:
    """The runner ``cfg.executor`` asks for, for the ``with`` block: ``local``, or a Dask runner on
    ``executor.address``, else on the flow's cluster (``flow_cluster``), else on a local cluster
    started for this block alone."""
    ex = cfg.executor
    if ex.kind == "local":
        yield LocalShards()
        return
    from prefect_dask import DaskTaskRunner

    with contextlib.ExitStack() as stack:
        address, where = ex.address or _FLOW_CLUSTER.get("address"), ""
        if not address:
            cluster, layout = stack.enter_context(local_cluster(ex))
            address, where = cluster.scheduler_address, f" (a local cluster of {layout} started for this stage)"
        scratch = ObjectScratch(cfg.home) if ex.scratch_on_store(cfg.home) else None
        with DaskTaskRunner(address=address) as runner:
            n = len(runner.client.scheduler_info()["workers"])
            get_run_logger().info("executor: dask, %d worker(s) at %s%s; shard files %s", n, address, where,
                                  f"through the store ({cfg.home}/{SCRATCH})" if scratch else "on a shared filesystem")
            yield DaskShards(runner, ex, max(n, 1), scratch)
