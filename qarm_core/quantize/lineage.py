"""Codebook lineage across embedding models.

A codebook lives in the space of the embedding model it was fitted on: warm-starting it on the
embeddings of another model (the weekly retrain: same width, another meaning) would start k-means from
centroids that mean nothing there, so ``quantize_stage`` refits instead. A refit numbers its cells
arbitrarily, which would change nearly every item's SID; ``align_to_previous`` renumbers the new
level-1 and level-2 cells so that each keeps, as far as possible, the label the previous codebook gave
to the items it now holds: per level, a maximum-weight matching (Hungarian) of new cells to old labels,
the weight being the number of items they share. Matching by items, not centroid distance, because
the two spaces are not comparable. The FSQ level is a fixed function of the level-2 residual and is
not renumbered. Renumbering is a bijection of cell labels, so collisions, resolution suffixes and
decoding are unchanged; only the labels (and the centroid rows, reordered to match) move.

Re-projection (``fit_input_map`` / ``apply_input_map``; ``quantize.lineage: reproject``, an option):
part of what a continued fine-tune changes is a linear distortion of the space (on a gentle real
ML-100K retrain the residual after an affine map was 0.17 of a level-1 cell's spread where a rotation
alone left 1.9; 1.1 where it left 3.4 after the weekly budget of 800 steps), which moves items across
cell borders without changing which items are close.
An affine map fitted by least squares from the new vectors to the ones the previous codebook
quantized, over the items both models embedded, takes the new vectors into the codebook's space;
the codebook is then refitted there from the previous one, and keeps the map for that model's vectors.
Where the new model is not wider than the codebook's space the map is invertible in general, so the
SIDs describe the new model's vectors up to that change of coordinates (and the row normalisation
after it: the code metrics are measured on the mapped vectors, not on the native ones that GSU
reads); a wider new model is quantized through a projection onto the codebook's width until a refit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from qarm_core.quantize.metrics import churn
from qarm_core.quantize.quantizer import Codebook
from qarm_core.quantize.sid import sid_strings


# on the normal equations of the map's fit: numerical safety only (the rows are unit vectors, so
# X^T X holds up to n on its diagonal)
MAP_RIDGE = 1e-3


def apply_input_map(x: np.ndarray, input_map: np.ndarray | None, inplace: bool = False) -> np.ndarray:
    """``x`` ``(n, d_in)`` through the affine ``input_map`` ``(d_in + 1, d)`` (last row: the
    offset), rows normalised to unit length as embeddings are; ``x`` itself (as float32) without a
    map. Returns float32 ``(n, d)``, computed in row chunks; with ``inplace`` and d == d_in, written
    back into ``x`` (no second copy of a 10M-row catalog). Refuses a map of another input width."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if input_map is None:
        return x
    if input_map.shape[0] != x.shape[1] + 1:
        raise ValueError(f"the input map takes {input_map.shape[0] - 1}-wide vectors, these are {x.shape[1]} wide")
    w, b = input_map[:-1].astype(np.float32), input_map[-1].astype(np.float32)
    out = x if inplace and w.shape[1] == x.shape[1] else np.empty((len(x), w.shape[1]), np.float32)
    for lo in range(0, len(x), 262_144):
        part = x[lo:lo + 262_144] @ w + b
        norms = np.sqrt(np.einsum("ij,ij->i", part, part))
        out[lo:lo + 262_144] = part / np.maximum(norms, np.finfo(np.float32).tiny)[:, None]
    return out


def fit_input_map(new: np.ndarray, target: np.ndarray, ridge: float = MAP_RIDGE) -> tuple[np.ndarray, float]:
    """The affine map ``(d_in + 1, d)`` of least squares from ``new`` ``(n, d_in)`` to ``target``
    ``(n, d)`` (rows = the same items), fitted in float64, and the RMS distance between the mapped,
    normalised rows and ``target`` (the part of the change a linear map cannot take out)."""
    a = np.c_[new.astype(np.float64), np.ones(len(new))]
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ target.astype(np.float64))
    mapped = apply_input_map(new, w)
    rmse = float(np.sqrt(((mapped.astype(np.float64) - target) ** 2).sum(1).mean())) if len(new) else 0.0
    return w, rmse


def prefix_churn(codes: pa.Table, previous_codes: pa.Table) -> float:
    """Share of the items in both tables whose (c1, c2) changed."""
    ids, prev_ids = codes["item_id"].to_numpy(), previous_codes["item_id"].to_numpy()
    _, at_new, at_old = np.intersect1d(ids, prev_ids, assume_unique=True, return_indices=True)
    return _prefix_changed([codes[c].to_numpy()[at_new] for c in ("c1", "c2")],
                           [previous_codes[c].to_numpy()[at_old] for c in ("c1", "c2")])


def _prefix_changed(new: list[np.ndarray], old: list[np.ndarray]) -> float:
    if len(new[0]) == 0:
        return 0.0
    return float(((new[0] != old[0]) | (new[1] != old[1])).mean())


def _suffixes(sids: np.ndarray) -> np.ndarray:
    return np.array([int(p[3]) if len(p) > 3 else 0 for p in (s.split("-") for s in sids)], np.int64)


def align_to_previous(book: Codebook, codes: pa.Table, previous_codes: pa.Table) -> tuple[Codebook, pa.Table, dict]:
    """Renumber ``book``'s level-1/level-2 cells onto ``previous_codes``' labels (see the module doc).

    ``codes``: the fresh CODES table of ``book``; ``previous_codes``: the published one. Returns the
    renumbered codebook and codes, and a report: per level the share of shared items whose label was
    kept; ``churn`` (share of shared items whose SID changed) and ``lineage.prefix_churn`` (whose
    (c1, c2) changed), each also before the renumbering (``*_unaligned``). The FSQ digits of a new
    space generally differ (the projection is refitted), so the full SID churns even where the
    prefix is kept.
    """
    from scipy.optimize import linear_sum_assignment

    ids = codes["item_id"].to_numpy()
    prev_ids = previous_codes["item_id"].to_numpy()
    shared, at_new, at_old = np.intersect1d(ids, prev_ids, assume_unique=True, return_indices=True)
    sids = codes["sid"].to_numpy(zero_copy_only=False)
    prev_sids = previous_codes["sid"].to_numpy(zero_copy_only=False)
    report = {"lineage.shared_items": float(len(shared)),
              "lineage.churn_unaligned": churn(prev_ids, prev_sids, ids, sids)["churn"]}
    centroids = list(book.centroids)
    cols = {"c1": codes["c1"].to_numpy().astype(np.int64), "c2": codes["c2"].to_numpy().astype(np.int64)}
    old_prefix = [previous_codes[c].to_numpy().astype(np.int64)[at_old] for c in ("c1", "c2")]

    def current_prefix_churn() -> float:
        return _prefix_changed([cols["c1"][at_new], cols["c2"][at_new]], old_prefix)

    report["lineage.prefix_churn_unaligned"] = current_prefix_churn()
    for level, col in enumerate(("c1", "c2")):
        k = centroids[level].shape[0]
        old = previous_codes[col].to_numpy().astype(np.int64)[at_old]
        if len(shared) == 0 or old.max(initial=-1) >= k:      # another K: nothing to match against
            report[f"lineage.{col}_kept"] = 0.0
            continue
        overlap = np.zeros((k, k), np.int64)
        np.add.at(overlap, (cols[col][at_new], old), 1)
        rows, labels = linear_sum_assignment(overlap, maximize=True)
        relabel = np.empty(k, np.int64)
        relabel[rows] = labels                                 # new cell -> the old label it takes
        reordered = np.empty_like(centroids[level])
        reordered[relabel] = centroids[level]
        centroids[level] = reordered
        cols[col] = relabel[cols[col]]
        report[f"lineage.{col}_kept"] = float((cols[col][at_new] == old).mean())
    c3 = codes["c3"].to_numpy()
    new_sids = sid_strings(cols["c1"], cols["c2"], c3, _suffixes(sids))
    out = codes.set_column(codes.schema.get_field_index("c1"), "c1", pa.array(cols["c1"], pa.int32()))
    out = out.set_column(out.schema.get_field_index("c2"), "c2", pa.array(cols["c2"], pa.int32()))
    out = out.set_column(out.schema.get_field_index("sid"), "sid", new_sids)
    report["lineage.prefix_churn"] = current_prefix_churn()
    report |= churn(prev_ids, prev_sids, ids, new_sids.to_numpy(zero_copy_only=False))
    return dataclasses.replace(book, centroids=centroids), out, report
