"""Quantize task (stage 5): Semantic IDs for the gated embeddings, stable across daily refreshes."""

from __future__ import annotations

import json

from prefect import get_run_logger, task

from qarm_core import __version__
from qarm_core.config import PipelineConfig
from qarm_core.hashing import stable_hash
from qarm_core.quantize.io import read_embeddings
from qarm_core.quantize.quantizer import CODEBOOK_FORMAT, load_codebook, save_codebook
from qarm_core.quantize.stage import quantize_stage
from qarm_core.schemas import CODES
from qarm_core.storage import DatasetRecord, Storage, read_dataset, write_stage_outputs
from tasks import tracking
from tasks.common import TASK_DEFAULTS


@task(name="quantize", **TASK_DEFAULTS)
def quantize(cfg: PipelineConfig, parent_run_id: str, embeddings: DatasetRecord) -> dict[str, DatasetRecord]:
    """Stages ``codes`` (item_id, c1, c2, c3, sid, resolved) and ``codebook`` (.npy + JSON).

    ``quantize.mode`` picks refit, warm start from the published codebook, or frozen encoding;
    metrics (collision, EdgeNum, HR@k, utilisation, MSE, churn) go to MLflow and ``metrics.json``.
    """
    storage = Storage(cfg.home)
    prev_book_rec, prev_codes_rec = storage.published("codebook"), storage.published("codes")
    use_prev = cfg.quantize.mode != "refit" and prev_book_rec is not None
    # Warm start and frozen encoding depend on the published codebook: it is part of the key.
    key = stable_hash({"embeddings": embeddings.fingerprint, "quantize": cfg.quantize.model_dump(mode="json"),
                       "previous": prev_book_rec.fingerprint if use_prev else None,
                       "previous_codes": prev_codes_rec.fingerprint if use_prev and prev_codes_rec else None,
                       "qarm": __version__, "schema": CODES.version})
    report: dict = {}
    state: dict = {}

    def produce_codes():
        ids, x = read_embeddings(embeddings.path)
        prev = load_codebook(prev_book_rec.path) if use_prev else None
        prev_codes = read_dataset(prev_codes_rec) if use_prev and prev_codes_rec else None
        book, codes, metrics, how = quantize_stage(x, ids, cfg.quantize.params(), cfg.quantize.mode, prev, prev_codes)
        state["book"] = book
        report.update({k: float(v) for k, v in metrics.items()})
        report["notes"] = {"how": how}
        return iter(codes.to_batches(max_chunksize=1_000_000))

    def write_codebook(folder):
        save_codebook(state["book"], folder)
        (folder / "metrics.json").write_text(json.dumps(report, indent=2, sort_keys=True))

    with tracking.stage_run(cfg, parent_run_id, "quantize") as run:
        records, reused, report = write_stage_outputs(
            storage, "quantize", key, {"codes": (CODES, produce_codes)}, report,
            artifacts={"codebook": (CODEBOOK_FORMAT, write_codebook)})
        run.params({"quantize": cfg.quantize.model_dump(mode="json"), "key": key,
                    "previous": prev_book_rec.path if use_prev else "none"})
        run.metrics({k: v for k, v in report.items() if isinstance(v, (int, float))}
                    | {"rows.codes": records["codes"].rows, "reused": float(reused)})
        run.tags({"qarm.quantize.how": report.get("notes", {}).get("how", "")})
        run.json({k: v for k, v in report.items() if k != "notes"}, "metrics.json")
        get_run_logger().info("quantize (%s): %s items, raw collision %.4f, after resolution %.4f",
                              report.get("notes", {}).get("how"), f"{records['codes'].rows:,}",
                              report.get("raw.collision_rate", float("nan")),
                              report.get("resolved.collision_rate", float("nan")))
    return records
