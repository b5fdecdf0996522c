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
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from qarm_core.quantize.metrics import churn
from qarm_core.quantize.quantizer import Codebook
from qarm_core.quantize.sid import sid_strings


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

    def prefix_churn() -> float:
        if len(shared) == 0:
            return 0.0
        return float(((cols["c1"][at_new] != old_prefix[0]) | (cols["c2"][at_new] != old_prefix[1])).mean())

    report["lineage.prefix_churn_unaligned"] = prefix_churn()
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
    report["lineage.prefix_churn"] = prefix_churn()
    report |= churn(prev_ids, prev_sids, ids, new_sids.to_numpy(zero_copy_only=False))
    return dataclasses.replace(book, centroids=centroids), out, report
