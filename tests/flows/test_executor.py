"""``executor.kind: dask``: a stage's shards as Prefect task runs on a 2-worker local Dask cluster
(prefect-dask's DaskTaskRunner) started by the run; a worker lost mid-shard costs a retry, not a
duplicate. (A whole refresh on Dask against the local one: tests/flows/test_codebook_refresh.py,
which holds the local reference run.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def die_once(job: tuple[str, int]) -> tuple[int, int]:
    """A shard whose first attempt kills its worker process mid-shard (shard 1 only)."""
    folder, index = Path(job[0]), job[1]
    marker = folder / f"died-{index}"
    if index == 1 and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)
    tmp = folder / f".out-{index}.{os.getpid()}"
    tmp.write_text(f"{index}\n")
    tmp.rename(folder / f"out-{index}")
    return index, os.getpid()


def test_a_lost_worker_s_shard_is_retried_not_duplicated(prefect_harness, tmp_path):
    from prefect import flow

    from qarm_core.config import PipelineConfig
    from tasks.executor import shard_runner

    cfg = PipelineConfig.model_validate({"home": str(tmp_path / "home"),
                                         "executor": {"kind": "dask", "workers": 2, "shard_retries": 1}})

    @flow(name="shard-drill")
    def drill() -> list[tuple[int, int]]:
        with shard_runner(cfg) as shards:
            return shards.run(die_once, [(str(tmp_path), i) for i in range(4)], "drill")

    results = drill()
    assert [i for i, _ in results] == [0, 1, 2, 3]
    died = int((tmp_path / "died-1").read_text())
    assert dict(results)[1] != died                                       # shard 1 ran again elsewhere
    assert sorted(p.name for p in tmp_path.glob("out-*")) == [f"out-{i}" for i in range(4)]
    assert all((tmp_path / f"out-{i}").read_text() == f"{i}\n" for i in range(4))
    assert not list(tmp_path.glob(".out-*"))


def test_a_local_cluster_gives_each_worker_its_own_gpu(prefect_harness):
    """One model replica per GPU: worker i of a local cluster the run starts sees GPU i mod n alone
    (CUDA_VISIBLE_DEVICES, set as the worker starts, before any shard initialises CUDA). This host
    has no GPU, so the test names two."""
    from distributed import Client

    from qarm_core.executor import ExecutorConfig
    from tasks.executor import local_cluster

    ex = ExecutorConfig(kind="dask", workers=3)
    with local_cluster(ex, gpus=["0", "1"]) as (cluster, layout), Client(cluster) as client:
        seen = client.run(os.getenv, "CUDA_VISIBLE_DEVICES")          # os.getenv runs in each worker
        names = {addr: w["name"] for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()}
    assert {names[addr]: gpu for addr, gpu in seen.items()} == {0: "0", 1: "1", 2: "0"}
    assert layout == "3 worker(s) x 1 thread(s), worker i on GPU [0, 1][i mod 2]"
    # without GPUs (this host: every other Dask test here) no worker is pinned
