"""Split task: the train / validation / test periods of the gated interactions (``qarm_core.split``)."""

from __future__ import annotations

from prefect import task

from qarm_core.config import PipelineConfig
from qarm_core.schemas import SCHEMAS
from qarm_core.split import split_events, split_gate
from qarm_core.storage import DatasetRecord, read_dataset
from tasks.common import TASK_DEFAULTS, StageSpec, run_stage

OUTPUTS = ("train_events", "valid_events", "periods")


@task(name="split", **TASK_DEFAULTS)
def split(cfg: PipelineConfig, parent_run_id: str, interactions: DatasetRecord) -> dict[str, DatasetRecord]:
    """Stage ``train_events`` / ``valid_events`` (the events of those periods) and ``periods`` (the
    cutoffs and counts); the gate on its edge checks that both periods hold enough events. Test-period
    events are not written: no later stage of the refresh can read them."""
    def gate(run, records, report) -> None:
        result = split_gate(read_dataset(records["periods"]), cfg.gates.split.min_train_events,
                            cfg.gates.split.min_valid_events)
        run.gate(result)
        result.raise_if_failed()

    records, _ = run_stage(cfg, parent_run_id, StageSpec(
        name="split", outputs={n: SCHEMAS[n] for n in OUTPUTS},
        produce=lambda: split_events(read_dataset(interactions), cfg.split),
        key_inputs={"interactions": interactions.fingerprint, "split": cfg.split.model_dump(mode="json")},
        params={"split": cfg.split.model_dump(mode="json")}, after=gate,
        summary=lambda recs, rep: "split: " + ", ".join(
            f"{p} {rep.get(f'{p}.events', 0):,} events / {rep.get(f'{p}.users', 0):,} users"
            for p in ("train", "valid", "test")) + f" (cutoffs {rep.get('cutoff.valid_start')}, "
                                                     f"{rep.get('cutoff.test_start')})"))
    return records
