"""Ingest task: read the configured source into staged interactions/items datasets."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import pyarrow as pa
from prefect import task

from qarm_core.config import PipelineConfig
from qarm_core.ingest import resolve_source
from qarm_core.schemas import SCHEMAS
from qarm_core.storage import CURRENT_AT_READ, DatasetRecord, Storage
from tasks.common import TASK_DEFAULTS, StageSpec, run_stage

DATASETS = ("interactions", "items")


def _lazy(fn: Callable[[], Iterable[pa.RecordBatch]]) -> Iterator[pa.RecordBatch]:
    # the source is read when its dataset is written, one dataset after the other
    yield from fn()


@task(name="ingest", **TASK_DEFAULTS)
def ingest(cfg: PipelineConfig, parent_run_id: str, parent: str | None = CURRENT_AT_READ) -> dict[str, DatasetRecord]:
    """Stage the source as ``interactions`` and ``items``; reuses a staged copy of the same input.
    ``parent``: the snapshot the ``published`` source reads (a refresh's, chosen at its start)."""
    Storage(cfg.home).ensure()
    source: dict = {}

    def key_inputs() -> dict:
        source["fingerprint"], source["batches"] = resolve_source(cfg.ingest, cfg.home, parent)
        return {"source": source["fingerprint"], "ingest": cfg.ingest.source}

    def after(run, records, report) -> None:
        run.params({"source_fingerprint": source["fingerprint"]})
        run.json({n: r.to_dict() for n, r in records.items()}, "records.json")

    records, _ = run_stage(cfg, parent_run_id, StageSpec(
        name="ingest", outputs={n: SCHEMAS[n] for n in DATASETS}, key_inputs=key_inputs,
        produce=lambda: ({n: _lazy(source["batches"][n]) for n in DATASETS}, {}),
        params={"source": cfg.ingest.source}, after=after,
        summary=lambda recs, rep: f"ingest {cfg.ingest.source}: " + ", ".join(
            f"{n}={r.rows:,} rows" for n, r in recs.items())))
    return records


# What an inputs snapshot (the ingest flow's) carries over from the current one: the refresh's caches,
# which stay valid for new data (each is keyed by item, pair, model or codebook, not by the log).
CARRIED = ("judgments", "judge_eval", "judge_neutral", "qa", "model", "two_tower", "embeddings", "codes",
           "codebook")
# The dataset whose absence marks a snapshot no refresh has split yet (an inputs snapshot).
SPLIT_DATASET = "periods"


@task(name="carry-over", **TASK_DEFAULTS)
def carry_over(cfg: PipelineConfig, snapshot_id: str | None) -> dict[str, DatasetRecord]:
    """The ``CARRIED`` datasets of snapshot ``snapshot_id`` (none without one), to publish beside newly
    ingested inputs."""
    if snapshot_id is None:
        return {}
    snap = Storage(cfg.home).snapshot(snapshot_id)
    return {n: snap.record(n) for n in CARRIED if n in snap.manifest.get("datasets", {})}
