"""What every stage's config shares: the strict base model and the DuckDB settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """A frozen config model: unknown keys and wrong types fail loudly (no silent default)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$"


class DuckDBConfig(Strict):
    memory_limit: str = Field("4GB", pattern=SIZE_PATTERN)
    max_temp_directory_size: str = Field("20GB", pattern=SIZE_PATTERN)
    threads: int = Field(2, ge=1)
