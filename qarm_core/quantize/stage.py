"""Stage 5 as one call: Semantic IDs for an embeddings snapshot, refitted, warm-started from the
published codebook, or encoded with it frozen (the daily refresh's choices)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import numpy as np
import pyarrow as pa

from qarm_core.quantize.lineage import align_to_previous, apply_input_map, fit_input_map, prefix_churn

from qarm_core.quantize.quantizer import (
    Codebook, QuantizerParams, assign_semantic_ids, carry_into_new_space, quantize_embeddings, validate_embeddings,
)

Mode = Literal["refit", "warm_start", "frozen"]


# How a new embedding model's codebook was made when the previous codes could guide it (the end of
# ``quantize_stage``'s ``how``): the churn of such a run is the retrain day's (gates.CodesGate).
CARRIED_OVER = "cells carried over by their items and matched to the previous codes"
REPROJECTED = "its vectors re-projected onto the previous codebook's space, refitted from it"
NEW_MODEL_RUNS = (CARRIED_OVER, REPROJECTED)


def quantize_stage(x: np.ndarray, item_ids: np.ndarray, params: QuantizerParams, mode: Mode = "warm_start",
                   previous: Codebook | None = None, previous_codes: pa.Table | None = None,
                   dataset: str = "embeddings", model_version: str = "",
                   previous_vectors: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, str]] | None = None
                   ) -> tuple[Codebook, pa.Table, dict[str, float], str]:
    """Codes for ``x`` ``(n_items, dim)``; returns (codebook, codes, metrics, how).

    ``how`` says what was done: ``frozen`` (encoded with ``previous``), ``warm_start`` (refitted from
    ``previous``, indices matched so unchanged items keep their SIDs; churn against
    ``previous_codes`` in the metrics) or ``refit`` (from scratch: asked for, no previous codebook,
    or a previous one that cannot apply, a new embedding width or other levels, said in ``how``).
    ``x`` is used as the residual buffer (modified in place).

    ``model_version``: the embedding model of ``x``. A previous codebook fitted on another model's
    embeddings lives in another space: it is never warm-started or used frozen. With the previous
    codes, its cells are carried into the new space by their items (``carry_into_new_space``: each
    centroid starts at the mean of its items' new vectors; the FSQ directions are oriented by the
    items' previous digits), refitted from there to convergence (``niter`` Lloyd passes, so that the
    next daily run on the same vectors keeps the codes), and the labels are then matched to the previous
    codes by item overlap (``lineage.align_to_previous``), with ``lineage.*`` and churn in the
    metrics; without them it fits from scratch. With ``params.lineage == "reproject"`` (the default)
    and ``previous_vectors(ids)`` giving (item ids, vectors, model version) of the embeddings the
    previous codebook was fitted on (the published ones; at least the rows of ``ids``, a seeded sample
    of this run's items, so that a 10M-item catalog is not read whole), ``x`` is first mapped onto that
    codebook's space instead
    (``lineage.fit_input_map`` over up to ``reproject_sample`` shared items) and refitted from the
    previous codebook to convergence; the codebook keeps the map (``Codebook.input_map``), which
    every later run on the same model applies to its vectors.
    """
    if mode != "refit" and previous is not None and previous.model_version != model_version:
        how = (f"refit: the published codebook was fitted on embeddings of model {previous.model_version or 'unknown'}, "
               f"these come from {model_version or 'an unnamed model'} (another embedding space)")
        same_form = previous_codes is not None and tuple(previous.params.levels) == tuple(params.levels)
        if same_form and params.lineage == "reproject":
            done = _reproject(x, item_ids, params, previous, previous_codes, dataset, model_version, previous_vectors)
            if isinstance(done, tuple):
                return *done[:3], f"{how}; {REPROJECTED}"
            how = f"{how}; {done}"
        if same_form:
            x = validate_embeddings(x, item_ids, dataset, min_items=max(params.levels))
            carried = carry_into_new_space(x, item_ids, previous, previous_codes)
            # Lloyd to convergence from the carried cells (a daily warm start runs warm_iter passes,
            # one by default): a codebook left short of a fixed point moves on the next daily runs on
            # the same vectors (measured on a real ML-100K retrain: 21% of the SIDs the next day),
            # which the daily churn gate then refuses
            converge = params.model_copy(update={"warm_iter": max(params.warm_iter, params.niter)})
            book, codes, metrics = quantize_embeddings(x, item_ids, converge, previous=carried,
                                                       previous_codes=previous_codes, inplace=True, dataset=dataset)
            book, codes, report = align_to_previous(dataclasses.replace(book, model_version=model_version), codes,
                                                    previous_codes)
            metrics = {k: v for k, v in metrics.items() if k not in ("churn", "churn_items")} | report
            return book, codes, metrics, f"{how}; {CARRIED_OVER}"
        book, codes, metrics = quantize_embeddings(x, item_ids, params, inplace=True, dataset=dataset)
        return dataclasses.replace(book, model_version=model_version), codes, metrics, how
    # the width of the vectors the codebook takes: its own, or its input map's (a re-projected model)
    in_dim = None if previous is None else previous.dim if previous.input_map is None else previous.input_map.shape[0] - 1
    usable = previous is not None and in_dim == x.shape[1] \
        and tuple(previous.params.levels) == tuple(params.levels) \
        and (mode == "frozen" or (previous.params.fsq_dims, previous.params.fsq_levels)
             == (params.fsq_dims, params.fsq_levels))
    if mode != "refit" and previous is not None and not usable:
        why = (f"refit: the published codebook (dim {in_dim}, levels {list(previous.params.levels)}, "
               f"FSQ {previous.params.fsq_dims}x{previous.params.fsq_levels}) does not fit dim {x.shape[1]}, "
               f"levels {list(params.levels)}, FSQ {params.fsq_dims}x{params.fsq_levels}")
        mode = "refit"
    else:
        why = None
    if mode != "refit" and usable and previous.input_map is not None:
        # the codebook's space is a re-projection of this model's: its vectors go through the map
        x = apply_input_map(validate_embeddings(x, item_ids, dataset, dim=previous.input_map.shape[0] - 1),
                            previous.input_map, inplace=True)
    if mode == "frozen" and usable:
        x = validate_embeddings(x, item_ids, dataset, dim=previous.dim)
        codes, metrics = assign_semantic_ids(x, item_ids, previous, previous_codes=previous_codes, inplace=True,
                                             dataset=dataset)
        return previous, codes, metrics, "frozen"
    if mode in ("warm_start", "frozen") and usable:
        book, codes, metrics = quantize_embeddings(x, item_ids, params, previous=previous,
                                                   previous_codes=previous_codes, inplace=True, dataset=dataset)
        return dataclasses.replace(book, model_version=model_version, input_map=previous.input_map), codes, metrics, \
            "warm_start"
    book, codes, metrics = quantize_embeddings(x, item_ids, params, inplace=True, dataset=dataset)
    book = dataclasses.replace(book, model_version=model_version)
    return book, codes, metrics, why or ("refit" if mode == "refit" else "refit: no published codebook")


def _reproject(x: np.ndarray, item_ids: np.ndarray, params: QuantizerParams, previous: Codebook,
               previous_codes: pa.Table, dataset: str, model_version: str,
               previous_vectors: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, str]] | None
               ) -> tuple[Codebook, pa.Table, dict[str, float]] | str:
    """The new model's run by re-projection (see ``quantize_stage``): (codebook, codes, metrics), or
    why it could not be done (the caller carries the cells over instead)."""
    if previous_vectors is None:
        return "no previous embeddings to re-project onto: cells carried over instead"
    if (previous.params.fsq_dims, previous.params.fsq_levels) != (params.fsq_dims, params.fsq_levels):
        return "another FSQ form than the previous codebook's: cells carried over instead"
    x = validate_embeddings(x, item_ids, dataset, min_items=max(params.levels))
    item_ids = np.asarray(item_ids)
    # rows of x to fit on (sorted positions): all of them, or a seeded sample
    rows = np.arange(len(item_ids)) if len(item_ids) <= params.reproject_sample else \
        np.sort(np.random.default_rng([params.seed, 2]).choice(len(item_ids), params.reproject_sample, replace=False))
    want = item_ids[rows]
    prev_ids, prev_x, prev_version = previous_vectors(want)
    if prev_version != previous.model_version:
        return (f"the published embeddings come from model {prev_version or 'unknown'}, the codebook from "
                f"{previous.model_version or 'unknown'}: cells carried over instead")
    takes = previous.dim if previous.input_map is None else previous.input_map.shape[0] - 1
    if prev_x.shape[1] != takes:
        return (f"the previous embeddings have dim {prev_x.shape[1]}, its codebook takes {takes}: cells carried "
                "over instead")
    # the sample's items the published model embedded (ids are unique on both sides: checked above for
    # x, by the embeddings gate for the published ones), with their rows on both sides
    shared, at_want, at_old = np.intersect1d(want, np.asarray(prev_ids), assume_unique=True, return_indices=True)
    if len(shared) < 4 * (x.shape[1] + 1):       # a few rows per coefficient of each output coordinate
        return (f"{len(shared)} items in both models' embeddings (quantize.reproject_sample "
                f"{params.reproject_sample}), too few to fit a map: cells carried over instead")
    at_new = rows[at_want]
    # only the sampled rows of the published vectors, through the codebook's own map: what it quantized
    target = apply_input_map(prev_x[at_old], previous.input_map)
    del prev_x
    input_map, rmse = fit_input_map(x[at_new], target)
    del target
    mapped = apply_input_map(x, input_map, inplace=True)
    # to convergence, as when cells are carried over: the next daily run on the same vectors then
    # keeps the codes (one warm pass left 13% of the SIDs to move the next day on a real retrain)
    converge = params.model_copy(update={"warm_iter": max(params.warm_iter, params.niter)})
    book, codes, metrics = quantize_embeddings(mapped, item_ids, converge, previous=previous,
                                               previous_codes=previous_codes, inplace=True, dataset=dataset)
    metrics |= {"lineage.reproject_items": float(len(shared)), "lineage.reproject_rmse": rmse,
                "lineage.prefix_churn": prefix_churn(codes, previous_codes)}
    return dataclasses.replace(book, model_version=model_version, input_map=input_map), codes, metrics
