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

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE = REPO / ".cache" / "tests"
# configs/tiny.yaml with the judge and QA generator on a tiny random LM (written once per session by
# ``_tiny_test_config``), so a flow test runs the real judge code in seconds.
TINY = str(TEST_CACHE / "tiny.yaml")


def tiny_lm_path() -> Path:
    """A tiny random causal LM + tokenizer (real transformers model, ~1 s to build), built once."""
    from qarm_core.judge.testing import make_tiny_causal_lm

    path = TEST_CACHE / "tiny_lm"
    if not (path / "config.json").exists():
        tmp = TEST_CACHE / f"tiny_lm.tmp{os.getpid()}"
        make_tiny_causal_lm(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another session built it first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _tiny_test_config() -> str:
    import yaml

    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    lm = {"model_path": str(tiny_lm_path()), "dtype": "float32", "batch_size": 8}
    data["judge"] = {**data.get("judge", {}), "local": lm}
    data["qa"] = {**data.get("qa", {}), "local": lm}
    data.setdefault("embed", {}).setdefault("model", {})["model"] = str(tiny_lm_path())
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
