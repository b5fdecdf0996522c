"""The shard contract of ``qarm_core.executor``: a sharded run (catalog embedding by part; the
local LLM's scoring and generation by runs of requests) computes what the local run computes,
whatever order the shards run in and however often one runs; a missing shard fails the run instead
of committing a partial table. (The Dask runner: tests/flows/test_executor.py.)"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from qarm_core.embed.config import EmbedConfig, EmbedModelConfig
from qarm_core.errors import ConfigError, DataError


class ShuffledShards:
    """A stand-in for a cluster: jobs cross a pickle boundary (as to a worker process) and run in
    reverse order; ``repeat`` shards run twice (a lost worker's shard retried)."""

    workers = 2
    threads = None
    remote = True

    def __init__(self, repeat: tuple[int, ...] = (), drop: tuple[int, ...] = ()):
        self.repeat, self.drop, self.labels = repeat, drop, []

    def run(self, fn, jobs, label):
        self.labels.append(label)
        out = {}
        for i in reversed(range(len(jobs))):
            if i in self.drop:
                continue
            for _ in range(2 if i in self.repeat else 1):
                out[i] = fn(pickle.loads(pickle.dumps(jobs[i])))
        return [out[i] for i in sorted(out)]


def _parts(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(("_", ".")))


def test_sharded_embedding_writes_what_the_local_run_writes(tiny_lm_path, tiny_catalog, tmp_path):
    from qarm_core.embed.embed import embed_catalog
    from qarm_core.executor import LocalShards
    from qarm_core.quantize.io import read_embeddings

    items, _, _ = tiny_catalog
    mcfg = EmbedModelConfig(model=str(tiny_lm_path), dim=16, max_item_tokens=24, max_qa_tokens=24)
    ecfg = EmbedConfig(batch_size=4, chunk_rows=7, base_pooling="emb", dtype="float32")
    local = embed_catalog(items, tmp_path / "local", mcfg, ecfg, shards=LocalShards())
    shards = ShuffledShards(repeat=(1,))
    sharded = embed_catalog(items, tmp_path / "sharded", mcfg, ecfg, shards=shards)
    assert shards.labels == ["embed-sharded"]
    assert (sharded.rows, sharded.parts, sharded.parts_written, sharded.model_version, sharded.dim) == \
        (local.rows, local.parts, local.parts, local.model_version, local.dim)
    assert sharded.encoded == local.encoded == 24
    ids_l, x_l = read_embeddings(local.path)
    ids_s, x_s = read_embeddings(sharded.path)
    np.testing.assert_array_equal(ids_s, ids_l)                   # the rerun shard added no rows
    np.testing.assert_array_equal(x_s, x_l)                       # bit for bit
    assert _parts(tmp_path / "sharded") == _parts(tmp_path / "local") == [f"part-{k:05d}.parquet" for k in range(4)]
    assert not list((tmp_path / "sharded").glob(".*tmp*")) and not (tmp_path / "sharded" / "_items.parquet").exists()

    # resumable like the local run: only the missing part is a job
    (tmp_path / "sharded" / "part-00002.parquet").unlink()
    again = embed_catalog(items, tmp_path / "sharded", mcfg, ecfg, shards=ShuffledShards())
    assert (again.parts_written, again.parts_skipped, again.encoded) == (1, 3, 7)
    np.testing.assert_array_equal(read_embeddings(again.path)[1], x_l)


def test_sharded_minilm_writes_what_the_local_run_writes(tiny_catalog, tmp_path):
    """The MiniLM baseline shards like the LLM: one job per part, a worker's own replica, the same files."""
    from qarm_core.embed.embed import embed_catalog_minilm
    from qarm_core.quantize.io import read_embeddings

    items, _, _ = tiny_catalog
    ecfg = EmbedConfig(batch_size=4, chunk_rows=10)
    local = embed_catalog_minilm(items, tmp_path / "local", ecfg)
    shards = ShuffledShards(repeat=(0,))
    sharded = embed_catalog_minilm(items, tmp_path / "minilm", ecfg, shards=shards)
    assert shards.labels == ["embed-minilm"]
    assert (sharded.rows, sharded.parts, sharded.parts_written, sharded.model_version, sharded.dim) == \
        (local.rows, 3, 3, local.model_version, 384)
    ids_l, x_l = read_embeddings(local.path)
    ids_s, x_s = read_embeddings(sharded.path)
    np.testing.assert_array_equal(ids_s, ids_l)
    np.testing.assert_array_equal(x_s, x_l)                       # bit for bit
    with pytest.raises(DataError, match="stage=embed.*does not exist"):
        embed_catalog_minilm(items, tmp_path / "x", ecfg, model_path=str(tmp_path / "nope"), shards=shards)


def test_a_missing_shard_commits_nothing(tiny_lm_path, tiny_catalog, tmp_path):
    """A runner that loses a shard without raising: the run fails naming the stage and the part."""
    from qarm_core.embed.embed import embed_catalog

    items, _, _ = tiny_catalog
    mcfg = EmbedModelConfig(model=str(tiny_lm_path), dim=16, max_item_tokens=24, max_qa_tokens=24)
    ecfg = EmbedConfig(batch_size=4, chunk_rows=10, base_pooling="emb", dtype="float32")
    with pytest.raises(DataError, match=r"stage=embed.*1 of 3 part\(s\) missing.*part 1.*nothing was committed"):
        embed_catalog(items, tmp_path / "e", mcfg, ecfg, shards=ShuffledShards(drop=(1,)))


class HostWithoutTheDriversFiles(ShuffledShards):
    """Jobs as on a worker of another host: the driver's local root is moved away while they run
    (a job that named one of its paths would fail), and the worker has a local root of its own."""

    def __init__(self, scratch, driver_root, worker_root, monkeypatch, drop=()):
        super().__init__(repeat=(0,), drop=drop)
        self.scratch, self.driver_root, self.worker_root, self.mp = scratch, driver_root, worker_root, monkeypatch

    def run(self, fn, jobs, label):
        from qarm_core.storage import LOCAL_ROOT_ENV

        away = self.driver_root.with_name(self.driver_root.name + "-away")
        self.driver_root.rename(away)
        self.mp.setenv(LOCAL_ROOT_ENV, str(self.worker_root))
        try:
            return super().run(fn, jobs, label)
        finally:
            self.mp.setenv(LOCAL_ROOT_ENV, str(self.driver_root.parent))
            away.rename(self.driver_root)


def test_shards_that_see_only_the_object_store_write_what_the_local_run_writes(
        tiny_lm_path, tiny_catalog, tmp_path, tmp_path_factory, monkeypatch):
    """executor.scratch=object_store: the jobs name keys of the s3:// home's store, never the
    driver's paths. A model that lives in the home, the catalog and the published embeddings reach
    the worker through the store (fetched once into its own local root; of the snapshot, only the
    dataset, checked against the manifest), its parts come back through it, the result is bit for
    bit the local run's (vectors and model version), and the scratch prefix is deleted once every
    part is back. A run that lost a part fails naming it and leaves its prefix, which its rerun
    reuses and clears, or the sweep deletes. (moto's S3 server on 127.0.0.1.)"""
    import shutil

    import pyarrow.parquet as pq

    from qarm_core.embed.embed import embed_catalog
    from qarm_core.executor import LocalShards
    from qarm_core.quantize.io import read_embeddings
    from qarm_core.scratch import SCRATCH, ObjectScratch
    from qarm_core.storage import LOCAL_ROOT_ENV, Storage, artifact_record
    from tests.support.s3 import moto_s3_server, use_s3_server

    items, _, _ = tiny_catalog
    ecfg = EmbedConfig(batch_size=4, chunk_rows=7, base_pooling="emb", dtype="float32")
    with moto_s3_server() as server:
        home = use_s3_server(monkeypatch, server, tmp_path_factory)
        monkeypatch.setenv(LOCAL_ROOT_ENV, str(tmp_path / "driver"))
        st = Storage(home).ensure()
        # a model only the driver's host holds; its version is named after its folder
        model = st.staging_dir / "train" / "tiny-llama"
        shutil.copytree(tiny_lm_path, model)
        mcfg = EmbedModelConfig(model=str(model), dim=16, max_item_tokens=24, max_qa_tokens=24)
        local = embed_catalog(items, tmp_path / "local", mcfg, ecfg, shards=LocalShards())
        scratch = ObjectScratch(home)
        worker = tmp_path / "worker"
        shards = HostWithoutTheDriversFiles(scratch, st.home, worker, monkeypatch)
        out = st.work_dir / "embed" / "finetuned"
        sharded = embed_catalog(items, out, mcfg, ecfg, shards=shards)
        np.testing.assert_array_equal(read_embeddings(sharded.path)[1], read_embeddings(local.path)[1])
        assert (sharded.parts, sharded.parts_written, sharded.encoded) == (4, 4, 24)
        assert _parts(out) == [f"part-{k:05d}.parquet" for k in range(4)]
        versions = {v for p in out.glob("part-*.parquet") for v in pq.read_table(p)["model_version"].to_pylist()}
        assert versions == {local.model_version} and "tiny-llama" in local.model_version
        copies = list(worker.rglob("config.json"))
        assert len(copies) == 1 and copies[0].parent.name == "tiny-llama", copies   # fetched once
        assert not st.remote.fs.find(st.remote.path(SCRATCH))      # scratch cleared

        # carried over from the published embeddings: the worker fetches that dataset alone
        snap = st.publish({"embeddings": artifact_record("embeddings", out, 1),
                           "model": artifact_record("model", model, 1)})
        again = embed_catalog(items, st.work_dir / "embed" / "again", mcfg, ecfg, shards=shards,
                              previous=snap.record("embeddings").path)
        assert (again.encoded, again.carried_over) == (0, 24)
        np.testing.assert_array_equal(read_embeddings(again.path)[1], read_embeddings(local.path)[1])
        assert not list(worker.glob("*/snapshots/*"))              # not the whole snapshot
        assert len(list(worker.rglob("config.json"))) == 2         # inputs are keyed by the run's output folder
        assert len(list(worker.rglob("embeddings/part-*.parquet"))) == 4
        assert not st.remote.fs.find(st.remote.path(SCRATCH))

        # a shard lost without an error: the run fails naming the part and leaves its prefix
        lossy = HostWithoutTheDriversFiles(scratch, st.home, worker, monkeypatch, drop=(1,))
        with pytest.raises(DataError, match=r"stage=embed.*1 of 4 part\(s\) missing.*part 1"):
            embed_catalog(items, st.work_dir / "embed" / "lossy", mcfg, ecfg, shards=lossy)
        left = st.remote.fs.find(st.remote.path(SCRATCH))
        assert left and scratch.sweep(3600) == 0                   # younger than the sweep's age: kept
        # its rerun runs the missing part alone and clears the prefix
        rerun = embed_catalog(items, st.work_dir / "embed" / "lossy", mcfg, ecfg, shards=shards)
        assert (rerun.parts_written, rerun.parts_skipped) == (1, 3)
        assert not st.remote.fs.find(st.remote.path(SCRATCH))
        # a failed run whose inputs never come again: the sweep deletes what it left
        with pytest.raises(DataError, match="missing"):
            embed_catalog(items.slice(0, 20), st.work_dir / "embed" / "gone", mcfg, ecfg, shards=lossy)
        assert scratch.sweep(0) > 0 and not st.remote.fs.find(st.remote.path(SCRATCH))


def test_executor_config_is_strict(tmp_path, monkeypatch):
    monkeypatch.delenv("QARM_HOME", raising=False)
    from pydantic import ValidationError

    from qarm_core.config import PipelineConfig

    assert PipelineConfig().executor.kind == "local"
    assert PipelineConfig.model_validate({"executor": {"kind": "dask", "workers": 3}}).executor.workers == 3
    # independent stages overlap only where their work leaves this process (the Dask cluster)
    overlap = {(kind, flag): PipelineConfig.model_validate({"executor": {"kind": kind, "overlap_stages": flag}}
                                                           ).executor.stages_overlap
               for kind in ("local", "dask") for flag in (True, False)}
    assert overlap == {("local", True): False, ("local", False): False, ("dask", True): True, ("dask", False): False}
    for bad in ({"kind": "ray"}, {"workers": 0}, {"nodes": 2}, {"workers": "2"}, {"overlap_stages": "yes"},
                {"scratch": "nfs"}, {"worker_env": {"A": 1}}):
        with pytest.raises(ValidationError):
            PipelineConfig.model_validate({"executor": bad})
    # shard files through the store: by default for a remote cluster with an s3:// home, never on a folder home
    on_store = {(scratch, address, home): PipelineConfig.model_validate(
                    {"executor": {"kind": "dask", "scratch": scratch, "address": address}}
                ).executor.scratch_on_store(home)
                for scratch in ("auto", "shared", "object_store") for address in ("", "tcp://h:8786")
                for home in ("s3://b/p", "/srv/home")}
    assert {k for k, v in on_store.items() if v} == {
        ("auto", "tcp://h:8786", "s3://b/p"), ("object_store", "", "s3://b/p"), ("object_store", "tcp://h:8786", "s3://b/p"),
        ("object_store", "", "/srv/home"), ("object_store", "tcp://h:8786", "/srv/home")}
    with pytest.raises(ConfigError, match="executor.scratch: object_store needs an s3:// home"):
        PipelineConfig.model_validate({"home": str(tmp_path), "executor": {"kind": "dask", "scratch": "object_store"}}
                                      ).resolved()


def test_shard_bounds_keep_a_context_s_requests_together():
    from qarm_core.lm.sharded import shard_bounds

    ctx = ["a"] * 5 + ["b"] * 2 + ["c"] * 4
    assert shard_bounds(ctx, 3) == [(0, 5), (5, 11)]          # cuts moved past equal contexts
    assert shard_bounds(["a"] * 10, 3) == [(0, 6), (6, 10)]   # ... by at most another shard
    assert shard_bounds(list("abcdefg"), 3) == [(0, 3), (3, 6), (6, 7)]
    assert shard_bounds([], 3) == []


def test_sharded_lm_on_workers_computes_what_it_computes_here(tiny_lm_path):
    """Scoring and generation cut into shards of 3 requests: run on 'workers' (each job pickled and
    run on a replica of the model built from the config) they give the local run's numbers bit for
    bit, in the caller's order."""
    from qarm_core.lm.config import LocalModelConfig
    from qarm_core.lm.sharded import ShardedLM, local_backend

    cfg = LocalModelConfig(model_path=str(tiny_lm_path), dtype="float32", batch_size=2, shard_requests=3)
    here = local_backend(cfg)
    shards = ShuffledShards()
    there = ShardedLM(here.inner, cfg, shards, name="judge")
    ctxs = ["The item: alpha."] * 4 + ["The item: beta."] + ["The item: gamma, a longer one."] * 3
    conts = [" one", " two two", " three", " four", " five", " six six six", " seven", " eight"]
    a = here.continuation_logprobs(ctxs, conts, prefix="Related items. ")
    b = there.continuation_logprobs(ctxs, conts, prefix="Related items. ")
    assert [x.shape for x in a] == [y.shape for y in b] and len(a) == 8
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    prompts = [f"Name a colour number {i}." for i in range(5)]
    assert there.generate(prompts, 4) == here.generate(prompts, 4)
    assert shards.labels == ["judge-score", "judge-generate"]
    assert there.model_id == here.model_id and there.dtype_choice == here.dtype_choice
    # a driver whose shards run on workers loads no weights, and computes the same
    driver = local_backend(cfg, ShuffledShards(), name="judge")
    assert driver.inner.model is None and here.inner.model is not None
    assert all(np.array_equal(x, y) for x, y in zip(a, driver.continuation_logprobs(ctxs, conts, prefix="Related items. ")))
    assert driver.chat_prompt("Hi.") == here.chat_prompt("Hi.")
    with pytest.raises(ValueError, match="contexts but"):
        there.continuation_logprobs(ctxs, conts[:-1])
