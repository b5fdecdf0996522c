"""Quantize task (stage 5): Semantic IDs for the gated embeddings, stable across daily refreshes."""

from __future__ import annotations

import json

from prefect import task

from qarm_core.config import PipelineConfig
from qarm_core.gates import churn_gate
from qarm_core.plots import plot_codes
from qarm_core.quantize.io import read_embeddings, read_model_version
from qarm_core.quantize.quantizer import CODEBOOK_FORMAT, load_codebook, save_codebook
from qarm_core.quantize.stage import CARRIED_OVER, REPROJECTED, quantize_stage
from qarm_core.schemas import CODES
from qarm_core.storage import CURRENT_AT_READ, DatasetRecord, Storage, read_dataset
from tasks import tracking
from tasks.common import TASK_DEFAULTS, StageSpec, run_stage


@task(name="quantize", **TASK_DEFAULTS)
def quantize(cfg: PipelineConfig, parent_run_id: str, embeddings: DatasetRecord,
             parent: str | None = CURRENT_AT_READ) -> dict[str, DatasetRecord]:
    """Stages ``codes`` (item_id, c1, c2, c3, sid, resolved) and ``codebook`` (.npy + JSON).

    ``quantize.mode`` picks refit, warm start from the published codebook, or frozen encoding;
    metrics (collision, EdgeNum, HR@k, utilisation, MSE, churn) go to MLflow and ``metrics.json``.
    ``parent``: the snapshot whose codebook and codes a warm start continues.
    """
    storage = Storage(cfg.home).as_of(parent)
    prev_book_rec, prev_codes_rec = storage.published("codebook"), storage.published_cache("codes")
    # what the published codebook quantized: a new model's vectors are re-projected onto it
    prev_emb_rec = storage.published("embeddings")
    use_prev = cfg.quantize.mode != "refit" and prev_book_rec is not None
    report: dict = {}

    def produce():
        ids, x = read_embeddings(embeddings.path)
        version = read_model_version(embeddings.path)
        prev = load_codebook(prev_book_rec.path) if use_prev else None
        prev_codes = read_dataset(prev_codes_rec) if use_prev and prev_codes_rec else None
        def published_vectors(want):    # (ids, vectors, model version) of the published rows of ``want``
            return *read_embeddings(prev_emb_rec.path, only=want), read_model_version(prev_emb_rec.path)

        book, codes, metrics, how = quantize_stage(x, ids, cfg.quantize.params(), cfg.quantize.mode, prev, prev_codes,
                                                   model_version=version, previous_vectors=published_vectors
                                                   if use_prev and prev_emb_rec is not None else None)
        lineage = (f"{prev.model_version or 'unknown'} -> {version}" if prev is not None else f"new: {version}")
        # what the fit started from, after the stage decided (a published codebook may be set aside)
        started = ("none" if prev is None else prev_book_rec.path if how in ("warm_start", "frozen")
                   else f"{prev_book_rec.path} (its cells carried over, then refitted)" if how.endswith(CARRIED_OVER)
                   else f"{prev_book_rec.path} (the new vectors re-projected onto it, then refitted)"
                   if how.endswith(REPROJECTED)
                   else "none")
        report.update({k: float(v) for k, v in metrics.items()},
                      notes={"quantize.how": how, "codebook.lineage": lineage, "quantize.previous": started})
        return {"codes": codes, "book": book}, report

    def write_codebook(folder, made) -> None:
        save_codebook(made["book"], folder)
        # Timings go to MLflow only: the artifact is a function of its inputs (same inputs, same bytes).
        quality = {k: v for k, v in report.items() if "seconds" not in k}
        (folder / "metrics.json").write_text(json.dumps(quality, indent=2, sort_keys=True))

    def log_metrics_and_gate_churn(run, records, rep) -> None:
        run.json({k: v for k, v in rep.items() if k != "notes"}, "metrics.json")
        if cfg.tracking.plots:
            tracking.log_plot(tracking.run_handle(cfg, parent_run_id), plot_codes,
                              read_dataset(records["codes"], columns=["c1", "c2", "c3"]), cfg.quantize.code_sizes,
                              name="quantize_codes.png", raw_collision=rep.get("raw.collision_rate"))
        stable = churn_gate("quantize", rep, rep.get("notes", {}).get("quantize.how", ""), cfg.gates.codes)
        run.gate(stable)
        stable.raise_if_failed()

    # Warm start and frozen encoding depend on the published codebook: it is part of the key.
    records, _ = run_stage(cfg, parent_run_id, StageSpec(
        name="quantize", outputs={"codes": CODES}, produce=produce,
        artifacts={"codebook": (CODEBOOK_FORMAT, write_codebook)},
        key_inputs={"embeddings": embeddings.fingerprint, "quantize": cfg.quantize.model_dump(mode="json"),
                    "previous": prev_book_rec.fingerprint if use_prev else None,
                    "previous_codes": prev_codes_rec.fingerprint if use_prev and prev_codes_rec else None,
                    # read only to re-project a new model's vectors (quantize.lineage: reproject)
                    "previous_embeddings": prev_emb_rec.fingerprint
                    if use_prev and prev_emb_rec and cfg.quantize.lineage == "reproject" else None},
        params={"quantize": cfg.quantize.model_dump(mode="json")},
        after=log_metrics_and_gate_churn,
        summary=lambda recs, rep: (
            f"quantize ({rep.get('notes', {}).get('quantize.how')}): {recs['codes'].rows:,} items, "
            f"decode HR@1 {rep.get('raw.decode_hr@1', float('nan')):.4f} / HR@10 "
            f"{rep.get('raw.decode_hr@10', float('nan')):.4f} ((c1, c2) alone "
            f"{rep.get('rkmeans.decode_hr@1', float('nan')):.4f}), raw collision "
            f"{rep.get('raw.collision_rate', float('nan')):.4f} ((c1, c2) alone "
            f"{rep.get('rkmeans.collision_rate', float('nan')):.4f}), after resolution "
            f"{rep.get('resolved.collision_rate', float('nan')):.4f}")))
    return records
