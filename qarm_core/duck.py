"""DuckDB connections that never exhaust memory or disk: a memory limit and a spill cap, always."""

from __future__ import annotations

from pathlib import Path

import duckdb

from qarm_core.base import DuckDBConfig


def connect(cfg: DuckDBConfig, temp_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with ``memory_limit``, ``threads`` and a capped spill folder."""
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    return duckdb.connect(":memory:", config={
        "memory_limit": cfg.memory_limit,
        "max_temp_directory_size": cfg.max_temp_directory_size,
        "temp_directory": str(temp_dir),
        "threads": cfg.threads,
    })


def parquet_source(glob_or_files: str | list[str]) -> str:
    """A SQL table expression reading Parquet files (paths quoted safely)."""
    if isinstance(glob_or_files, str):
        glob_or_files = [glob_or_files]
    quoted = ", ".join("'" + str(p).replace("'", "''") + "'" for p in glob_or_files)
    return f"read_parquet([{quoted}])"
