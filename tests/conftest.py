"""Shared fixtures. Real components throughout: DuckDB, an MLflow sqlite store in tmp, Prefect's engine."""

from __future__ import annotations

import os

# Before prefect/mlflow are imported anywhere.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("QARM_HOME", None)
# `make test` runs two pytest workers (pytest-xdist) on the 2-core CI box: one torch thread each, so the
# two never oversubscribe the cores (2 x 2 threads on 2 cores ran the judge tests 2.1x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.support.paths import REPO, TEST_CACHE, TINY, build_tiny_lm  # noqa: E402


# The test files that run longest, longest first (per-file sums of pytest --durations on a 2-core AVX2
# EPYC, 2026-12-04, from cold caches as CI starts: the real judge's and the trainer's files then carry
# the SmolLM2 conversion and DeepSpeed's op build). `make test` hands whole files to two workers
# (--dist loadfile --no-loadscope-reorder: in collection order); a long file started last leaves the
# other worker idle at the end, so these are collected first.
LONGEST_FILES = (
    "tests/flows/test_codebook_refresh.py",
    "tests/unit/test_judge_eval.py",
    "tests/unit/test_embed_train.py",
    "tests/reliability/test_kill_drills.py",
    "tests/stack/test_stack.py",
    "tests/flows/test_rank_train.py",
    "tests/reliability/test_bad_inputs.py",
    "tests/reliability/test_renamed_items.py",
    "tests/unit/test_quantize_quality.py",
    "tests/flows/test_cli.py",
    "tests/flows/test_served_deployment.py",
)


def pytest_collection_modifyitems(config, items):
    """The files of ``LONGEST_FILES`` first, in its order; the rest as collected (a stable sort)."""
    first = {f: i for i, f in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: first.get(item.nodeid.split("::", 1)[0], len(first)))


@pytest.fixture(scope="session", autouse=True)
def _tiny_test_config() -> str:
    import yaml

    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    # 64 requests a shard: the judge's ~290 pairs and QA's ~80 questions are several shards, locally
    # and on the Dask workers of tests/flows (executor.kind=dask)
    lm = {"model_path": str(build_tiny_lm()), "dtype": "float32", "batch_size": 8, "shard_requests": 64}
    data["judge"] = {**data.get("judge", {}), "local": lm}
    data["qa"] = {**data.get("qa", {}), "local": lm}
    data.setdefault("embed", {}).setdefault("model", {})["model"] = str(build_tiny_lm())
    # plots cost 1-4 s a refresh and the suite runs dozens; the tests of the plots turn them on
    data.setdefault("tracking", {})["plots"] = False
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = TEST_CACHE / f"tiny.yaml.tmp{os.getpid()}"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(TINY)
    return TINY


@pytest.fixture(scope="session")
def recbole_wheel() -> Path:
    """The real recbole wheel (pip download once into the repo's .cache)."""
    from qarm_core.ingest import fetch_recbole_wheel

    return fetch_recbole_wheel(REPO / ".cache" / "recbole")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny pipeline config with its home in a fresh tmp folder."""
    from qarm_core.config import load_config

    return load_config(TINY, {"home": str(tmp_path / "home")}).resolved()


@pytest.fixture(scope="session")
def tiny_lm_path() -> Path:
    """The tiny random causal LM's folder (``lm.tiny.make_tiny_causal_lm``, seed 0), built once."""
    return build_tiny_lm()


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_path):
    """The tiny LM loaded as a ``LocalLM`` in float32, batches of 4."""
    from qarm_core.lm.config import LocalModelConfig
    from qarm_core.lm.local import LocalLM

    return LocalLM(LocalModelConfig(model_path=str(tiny_lm_path), dtype="float32", batch_size=4))


@pytest.fixture(scope="module")
def tiny_catalog():
    """(items, judgments, qa) of 24 items in 4 genres (``support.data.tiny_catalog``)."""
    from tests.support.data import tiny_catalog as build

    return build()
