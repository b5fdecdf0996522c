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
TINY = str(REPO / "configs" / "tiny.yaml")


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
