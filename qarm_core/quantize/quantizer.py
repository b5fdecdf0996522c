"""Residual k-means + FSQ Semantic IDs: fit, encode, resolve collisions, measure.

Entry points: ``quantize_embeddings`` (fit, optionally warm-started, and encode in one pass),
``assign_semantic_ids`` (encode with a frozen codebook), and ``save_codebook``/``load_codebook``
(.npy + JSON, never pickle). Both entry points share one encoder; with ``inplace=True`` the input
array becomes the residual buffer, so a 10M x 128 snapshot (5 GB) needs no second copy.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from qarm_core.arrays import has_duplicates
from qarm_core.errors import DataError
from qarm_core.quantize import fsq as F
from qarm_core.quantize.config import QuantizerParams
from qarm_core.quantize.kmeans import _k, assign, fit_level, row_sqnorms, sticky, subtract_centroids
from qarm_core.quantize.metrics import churn, collision_metrics, decode_hit_rates, hit_rates, level_usage
from qarm_core.quantize.sid import resolve_collisions_cells, sid_keys, sid_strings

STAGE = "quantize"
log = logging.getLogger(__name__)
CODEBOOK_FORMAT = 1


@dataclass(frozen=True)
class Codebook:
    centroids: list[np.ndarray]               # per level (k, dim) float32
    # None only in a codebook carried into a new embedding space (``carry_into_new_space``): its
    # FSQ level is fitted there, oriented by the previous digits
    fsq: F.FSQCodebook | None
    params: QuantizerParams
    fit_report: list[dict] = field(default_factory=list)
    # the embedding model whose space the centroids live in ("" for codebooks from before lineage)
    model_version: str = ""
    # the fullest FSQ bin's share of the items the bins were fitted on (0: not recorded, read as
    # 1/levels): the baseline of the FSQ refit policy
    fsq_fit_bin_share: float = 0.0
    # (input width + 1, dim): the affine map that takes ``model_version``'s embeddings into the space the
    # centroids live in (``lineage.apply_input_map``), set when a new model's vectors were
    # re-projected onto the previous codebook's space; None: the embeddings are used as they are
    input_map: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return self.centroids[0].shape[1]


def validate_embeddings(x: np.ndarray, item_ids: np.ndarray, dataset: str = "embeddings",
                        dim: int | None = None, min_items: int = 1) -> np.ndarray:
    """Refuse what would silently produce garbage codes; returns x as contiguous float32."""
    if x.ndim != 2:
        raise DataError(STAGE, dataset, f"embeddings must be 2-D (n_items, dim), got shape {x.shape}")
    if len(x) == 0:
        raise DataError(STAGE, dataset, "no embeddings")
    if len(item_ids) != len(x):
        raise DataError(STAGE, dataset, f"{len(item_ids)} item ids for {len(x)} embeddings")
    if dim is not None and x.shape[1] != dim:
        raise DataError(STAGE, dataset, f"embedding dim {x.shape[1]} != codebook dim {dim}")
    if has_duplicates(item_ids):
        raise DataError(STAGE, dataset, "duplicate item ids")
    x = np.ascontiguousarray(x, dtype=np.float32)
    # One threaded pass of squared norms flags the suspects (a non-finite norm: NaN/inf, or a value
    # whose square overflows; a zero norm: all zeros, or squares that underflow), and only those
    # rows are checked element by element: 0.2 s at 10M x 128 where two numpy passes took 1.5 s.
    sq = row_sqnorms(x)
    bad, zero = ~np.isfinite(sq), sq == 0
    del sq
    for flags, exact in ((bad, lambda rows: ~np.isfinite(rows).all(1)), (zero, lambda rows: ~rows.any(1))):
        suspects = np.flatnonzero(flags)
        for lo in range(0, len(suspects), F.CHUNK):
            part = suspects[lo:lo + F.CHUNK]
            flags[part] = exact(x[part])
    if bad.any():
        raise DataError(STAGE, dataset, f"{int(bad.sum())} embeddings hold NaN/inf, e.g. item ids "
                                        f"{item_ids[bad][:5].tolist()}")
    if zero.any():   # no direction: every code would be an accident of tie-breaking
        raise DataError(STAGE, dataset, f"{int(zero.sum())} of {len(x)} embeddings are all zeros, e.g. item ids "
                                        f"{item_ids[zero][:5].tolist()}")
    if len(x) < min_items:
        raise DataError(STAGE, dataset, f"{len(x)} items is fewer than K={min_items} of the first level")
    return x


def quantize_embeddings(x: np.ndarray, item_ids: np.ndarray, params: QuantizerParams,
                        previous: Codebook | None = None, previous_codes: pa.Table | None = None,
                        inplace: bool = False, dataset: str = "embeddings",
                        ) -> tuple[Codebook, pa.Table, dict[str, float]]:
    """Fit residual k-means (full batch) and the FSQ level on ``x`` ``(n, dim)``, and encode it.

    With ``previous`` (the last published codebook) k-means is warm-started from its centroids
    (matched back to their indices) and its FSQ projection and bins are kept; with
    ``previous_codes`` assignment is sticky and churn is reported. Returns (codebook, codes, metrics).
    Bad input (not 2-D, empty, NaN/inf, duplicate ids, fewer items than the largest K, a dim other
    than the previous codebook's) raises DataError naming the stage and ``dataset``.
    """
    x = validate_embeddings(x, np.asarray(item_ids), dataset, dim=None if previous is None else previous.dim,
                            min_items=max(params.levels))
    if params.fsq_dims > x.shape[1]:   # FSQ projects the level-2 residual onto fsq_dims directions
        raise DataError(STAGE, dataset, f"fsq_dims={params.fsq_dims} exceeds the embedding dim {x.shape[1]}")
    if previous is not None and (tuple(previous.params.levels) != tuple(params.levels) or previous.dim != x.shape[1]):
        raise DataError(STAGE, "codebook", f"previous codebook (levels {previous.params.levels}, dim "
                                           f"{previous.dim}) does not fit levels {params.levels}, dim {x.shape[1]}")
    return _encode(x, item_ids, params, previous, previous_codes, fit=True, inplace=inplace)


def assign_semantic_ids(x: np.ndarray, item_ids: np.ndarray, codebook: Codebook,
                        previous_codes: pa.Table | None = None, inplace: bool = False,
                        dataset: str = "embeddings") -> tuple[pa.Table, dict[str, float]]:
    """Encode ``x`` ``(n, dim)`` with a frozen ``codebook`` (no refit); returns (codes, metrics).
    Bad input raises DataError naming the stage and ``dataset`` (see ``quantize_embeddings``)."""
    x = validate_embeddings(x, np.asarray(item_ids), dataset, dim=codebook.dim)
    _, codes, metrics = _encode(x, item_ids, codebook.params, codebook, previous_codes, fit=False, inplace=inplace)
    return codes, metrics


def _kmeans_levels(residual: np.ndarray, p: QuantizerParams, book: Codebook | None, fit: bool,
                   prev: dict | None) -> tuple[list[np.ndarray], np.ndarray, list[float], list[dict]]:
    """The two residual k-means levels, fitted (warm-started from ``book`` when given) or assigned
    with ``book``'s centroids; ``residual`` ``(n, dim)`` is reduced in place to what is left.
    Returns (centroids per level, codes ``(n, 2)`` int32, MSE after each level, fit reports)."""
    n = len(residual)
    centroids, codes, mse, report = [], np.empty((n, 2), np.int32), [], []
    for level, k in enumerate(p.levels):
        if fit:
            c, labels, _, rep = fit_level(residual, k, seed=p.seed + level, niter=p.niter,
                                          polish_iter=p.polish_iter, warmup_rows=_warmup_rows(p, n, k),
                                          warm_iter=p.warm_iter,
                                          previous=None if book is None else book.centroids[level])
            report.append({"level": level + 1, **rep})
        else:
            c = book.centroids[level]
            labels, _ = assign(residual, c, with_dist=False)
        if prev is not None and p.stickiness > 0:
            labels = sticky(residual, c, labels, prev["c12"][:, level], p.stickiness)
        subtract_centroids(residual, c, labels)
        centroids.append(c)
        codes[:, level] = labels
        del labels
        # The level's MSE, exactly: the mean squared norm of what is left after subtracting.
        mse.append(float(row_sqnorms(residual).astype(np.float64).mean()))
    return centroids, codes, mse, report


def _carried_over(prev: dict, fsq: F.FSQCodebook, z: np.ndarray, digits: np.ndarray, c1: np.ndarray,
                  c2: np.ndarray, p: QuantizerParams) -> np.ndarray:
    """``(n,)`` bool: items that keep their whole previous SID (resolved c3 and suffix). An item
    whose k-means codes did not change keeps it while it lies within fsq_margin bin widths of that
    FSQ cell: FSQ bins are narrow where items are dense, and without this a refresh would reshuffle
    SIDs for noise-level moves. Items moved by an earlier resolution keep their cell while it is
    still one of their candidate moves."""
    kept = np.zeros(len(c1), bool)
    same = np.flatnonzero((prev["c3"] >= 0) & (c1 == prev["c12"][:, 0]) & (c2 == prev["c12"][:, 1]))
    near = F.within_margin(fsq, z[same], F.unpack(prev["c3"][same], fsq.levels, fsq.dims), p.fsq_margin)
    moved_before = prev["resolved"][same] & ~near
    if moved_before.any():
        cand = F.alternatives(fsq, z[same[moved_before]], digits[same[moved_before]], p.max_alternatives)
        near[np.flatnonzero(moved_before)] = (cand == prev["c3"][same[moved_before], None]).any(1)
    kept[same[near]] = True
    return kept


def _resolve(c1: np.ndarray, c2: np.ndarray, new_c3: np.ndarray, suffix: np.ndarray, resolved: np.ndarray,
             kept: np.ndarray, fsq: F.FSQCodebook, z: np.ndarray, digits: np.ndarray, p: QuantizerParams) -> None:
    """Move colliding items (not ``kept``) to free FSQ cells, else give them a suffix; updates
    ``new_c3``, ``suffix`` and ``resolved`` in place. Priority: distance to the cell's centre (the
    item nearest the centre keeps the raw code)."""
    n, k2 = len(c1), p.levels[1]
    priority = np.empty(n, np.float32)
    if fsq.dims < 8:      # summed in order, as numpy does below 8 terms (pairwise from 8 on)
        _k().cell_priority(np.ascontiguousarray(z, np.float32), np.ascontiguousarray(digits, np.int32),
                           np.ascontiguousarray(fsq.centers, np.float32), priority)
    else:
        for lo in range(0, n, F.CHUNK):
            dz = z[lo:lo + F.CHUNK] - fsq.centers[np.arange(fsq.dims)[None, :], digits[lo:lo + F.CHUNK]]
            priority[lo:lo + F.CHUNK] = (dz * dz).sum(1)
    held_keys = sid_keys(c1, c2, new_c3, k2, fsq.code_space)   # kept rows: their carried-over code
    r_c3, r_suffix, r_resolved = resolve_collisions_cells(
        held_keys, new_c3, fsq.code_space, priority, participate=~kept, outside=kept & (suffix == 0),
        z=z, digits=digits, boundaries=fsq.boundaries, levels=fsq.levels, n_alt=p.max_alternatives)
    del priority, held_keys
    rest = ~kept
    if kept.any() and (r_suffix[rest] > 0).any():
        # Suffixes continue after those that carried-over SIDs already use on the same code.
        kept_keys = sid_keys(c1[kept], c2[kept], new_c3[kept], k2, fsq.code_space)
        k_suf = suffix[kept]
        top: dict[int, int] = {}
        for k, v in zip(kept_keys[k_suf > 0].tolist(), k_suf[k_suf > 0].tolist()):
            top[k] = max(top.get(k, 0), v)
        sfx = np.flatnonzero(rest & (r_suffix > 0))
        r_keys = sid_keys(c1[sfx], c2[sfx], r_c3[sfx], k2, fsq.code_space)
        r_suffix[sfx] += np.array([top.get(int(k), 0) for k in r_keys], np.int64)
    new_c3[rest], suffix[rest], resolved[rest] = r_c3[rest], r_suffix[rest], r_resolved[rest]


def _code_metrics(residual: np.ndarray, centroids: list[np.ndarray], fsq: F.FSQCodebook, c1: np.ndarray,
                  c2: np.ndarray, c3: np.ndarray, new_c3: np.ndarray, digits: np.ndarray, raw_keys: np.ndarray,
                  mse: list[float], p: QuantizerParams) -> dict[str, float]:
    """Collision, EdgeNum, HR@k, decode HR@k, utilisation and MSE per level. raw: codes as
    quantised; resolved: (c1, c2, c3) after moving colliding items (suffixes aside; the sid strings,
    suffix included, are unique); rkmeans: (c1, c2) alone."""
    n, (k1, k2) = len(c1), p.levels
    metrics: dict[str, float] = {"items": float(n), "code_space": float(k1 * k2 * fsq.code_space)}
    metrics |= {f"raw.{k}": v for k, v in collision_metrics(raw_keys).items()}
    metrics |= {f"resolved.{k}": v for k, v in collision_metrics(sid_keys(c1, c2, new_c3, k2, fsq.code_space)).items()}
    rk_keys = c1.astype(np.int64) * k2 + c2
    metrics |= {f"rkmeans.{k}": v for k, v in collision_metrics(rk_keys).items()}

    def original(rows: "np.ndarray | slice") -> np.ndarray:
        # The input vectors, rebuilt from the residual buffer (x may have been consumed in place).
        # HR@k asks for the rows of one (c1, c2) cell at a time: one centroid row each, broadcast,
        # instead of gathering it per row (same sums, same rounding).
        a, b = c1[rows], c2[rows]
        one_cell = len(a) > 0 and bool((a == a[0]).all() and (b == b[0]).all())
        out = residual[rows] + (centroids[0][a[0]] if one_cell else centroids[0][a])   # a new array
        out += centroids[1][b[0]] if one_cell else centroids[1][b]
        return out

    def decoded(rows: np.ndarray) -> np.ndarray:
        # What a SID decodes to: the sum of its codewords (raw codes, as quantised).
        return centroids[0][c1[rows]] + centroids[1][c2[rows]] + F.decode(fsq, digits[rows])

    def decoded_rk(rows: np.ndarray) -> np.ndarray:
        return centroids[0][c1[rows]] + centroids[1][c2[rows]]
    # Final SIDs are unique per item when every collision was resolved, so HR@k is measured on the
    # raw codes (what decoding a SID would face) and on the k-means-only codes for comparison.
    # (the input vectors rebuilt in the kernel from the residual buffer and the centroids, as
    # ``original`` does)
    levels_added = ((centroids[0], c1), (centroids[1], c2))
    for name, keys in (("raw", raw_keys), ("rkmeans", rk_keys)):
        metrics |= {f"{name}.{k}": v for k, v in hit_rates(residual, keys, sample=p.hr_sample, seed=p.seed,
                                                           add=levels_added).items()}
    if p.decode_hr_sample:
        t0, decoders = time.perf_counter(), {"raw": decoded, "rkmeans": decoded_rk}
        metrics |= decode_hit_rates(original, n, decoders, sample=p.decode_hr_sample, seed=p.seed)
        # each query scans the catalog once per decoder: n x dim multiply-adds (benchmarks' floor)
        metrics["decode_hr.queries"] = float(min(n, p.decode_hr_sample) * len(decoders))
        metrics["seconds.decode_hr"] = time.perf_counter() - t0
    for level, (codes_l, space) in enumerate(((c1, k1), (c2, k2), (c3, fsq.code_space)), start=1):
        metrics |= {f"level{level}.{k}": v for k, v in level_usage(codes_l, space).items()}
        metrics[f"level{level}.mse"] = mse[level - 1]
    return metrics


def _encode(x: np.ndarray, item_ids: np.ndarray, p: QuantizerParams, book: Codebook | None,
            previous_codes: pa.Table | None, fit: bool, inplace: bool) -> tuple[Codebook, pa.Table, dict[str, float]]:
    # Memory: besides x (which becomes the residual buffer when inplace), every per-item array here
    # is a few bytes wide and freed once used: ~150 B/item at the peak, so a 10M x 128 snapshot
    # (4.8 GiB of float32) stays within 8 GiB.
    t0 = time.perf_counter()
    n = len(item_ids)
    prev = _align_previous(previous_codes, item_ids) if previous_codes is not None else None
    residual = x if inplace else np.array(x, dtype=np.float32, copy=True)
    centroids, codes, mse, report = _kmeans_levels(residual, p, book, fit, prev)
    fit_seconds = time.perf_counter() - t0
    stamps = {"kmeans": fit_seconds}
    log.info("quantize: %s residual k-means levels %s on %s items in %.1f s; FSQ next", "fitted" if fit else "assigned",
             "+".join(map(str, p.levels)), f"{n:,}", fit_seconds)
    t1 = time.perf_counter()
    fsq, z, digits, fsq_metrics = _fsq_level(residual, p, book, fit, prev)
    codebook = Codebook(centroids, fsq, p, report if fit else book.fit_report,
                        fsq_fit_bin_share=fsq_metrics["fsq.fit_bin_share"])
    c1, c2 = codes[:, 0], codes[:, 1]
    c3 = F.pack(digits, fsq.levels)
    mse.append(F.reconstruction_mse(fsq, residual, digits, z))
    raw_keys = sid_keys(c1, c2, c3, p.levels[1], fsq.code_space)
    stamps["fsq"], t1 = time.perf_counter() - t1, time.perf_counter()
    log.info("quantize: FSQ level in %.1f s; resolving collisions", stamps["fsq"])

    new_c3, suffix, resolved = c3.copy(), np.zeros(n, np.int64), np.zeros(n, bool)
    kept = np.zeros(n, bool)
    if prev is not None:
        kept = _carried_over(prev, fsq, z, digits, c1, c2, p)
        new_c3[kept], suffix[kept], resolved[kept] = prev["c3"][kept], prev["suffix"][kept], prev["resolved"][kept]
    if p.resolve:
        _resolve(c1, c2, new_c3, suffix, resolved, kept, fsq, z, digits, p)
    del kept
    stamps["resolve"], t1 = time.perf_counter() - t1, time.perf_counter()
    log.info("quantize: collisions resolved in %.1f s; metrics (collision, HR@k, decode HR@k on %s queries) next",
             stamps["resolve"], f"{min(n, p.decode_hr_sample or 0):,}")

    metrics = _code_metrics(residual, centroids, fsq, c1, c2, c3, new_c3, digits, raw_keys, mse, p) | fsq_metrics
    del raw_keys, z, digits
    stamps["metrics"], t1 = time.perf_counter() - t1, time.perf_counter()
    metrics["resolved_share"] = float(resolved.mean())
    metrics["suffixed_share"] = float((suffix > 0).mean())

    sids = sid_strings(c1, c2, new_c3, suffix)
    table = pa.table({"item_id": pa.array(item_ids, pa.int64()), "c1": pa.array(c1, pa.int32()),
                      "c2": pa.array(c2, pa.int32()), "c3": pa.array(new_c3, pa.int64()),
                      "sid": sids, "resolved": pa.array(resolved, pa.bool_()), "c3_raw": pa.array(c3, pa.int64())})
    del c3
    if previous_codes is not None:
        metrics |= churn(previous_codes["item_id"].to_numpy(),
                         previous_codes["sid"].to_numpy(zero_copy_only=False), item_ids,
                         sids.to_numpy(zero_copy_only=False))
    stamps["table"] = time.perf_counter() - t1
    metrics |= {f"seconds.{k}": v for k, v in stamps.items()}
    metrics["fit_seconds"] = fit_seconds
    metrics["total_seconds"] = time.perf_counter() - t0
    return codebook, table, metrics


def _fsq_level(residual: np.ndarray, p: QuantizerParams, book: Codebook | None, fit: bool, prev: dict | None
               ) -> tuple[F.FSQCodebook, np.ndarray, np.ndarray, dict[str, float]]:
    """The FSQ level for ``residual`` ``(n, dim)`` and its projection ``z`` ``(n, f)`` and digits
    ``(n, f)``: fitted on a cold fit; on a warm start the published one, refitted (its directions as
    the reference) when its fullest bin drifted past ``p.fsq_refit_drift`` times its fitted share;
    frozen: the published one as is. A codebook carried into a new space (no FSQ level) fits one,
    its directions oriented by the previous digits of the items (``digit_directions``). Metrics:
    ``fsq.fullest_bin_share`` of the level used, ``fsq.fit_bin_share`` (its baseline),
    ``fsq.refit`` (1: refitted on this warm start)."""
    fit_form = F.fit_fsq_sigmoid if p.fsq_form == "sigmoid" else F.fit_fsq
    refit, drifted = 0.0, None
    fresh = fit and (book is None or book.fsq is None)
    if fresh:
        reference = None
        if book is not None and prev is not None and book.params.fsq_dims == p.fsq_dims:
            reference = digit_directions(residual, prev["c3"], p.fsq_levels, p.fsq_dims)
        fsq = fit_form(residual, p.fsq_dims, p.fsq_levels, seed=p.seed, reference=reference)
    else:
        fsq = book.fsq
    z = F.project(fsq, residual)                                   # (n, f) float32
    digits = F.digits_of(fsq, z)                                   # (n, f) int32
    share = F.fullest_bin_share(fsq, digits)
    baseline = share if fresh else (book.fsq_fit_bin_share or 1.0 / fsq.levels)
    if fit and not fresh and p.fsq_refit_drift is not None and share > p.fsq_refit_drift * baseline:
        drifted = share
        fsq = fit_form(residual, p.fsq_dims, p.fsq_levels, seed=p.seed, reference=book.fsq.components)
        z = F.project(fsq, residual)
        digits = F.digits_of(fsq, z)
        share = F.fullest_bin_share(fsq, digits)
        refit = 1.0
        log.info("quantize: the FSQ bins drifted (fullest bin %.3f of the items, %.2fx the fitted share): "
                 "FSQ level refitted", drifted, drifted / baseline)
        baseline = share
    metrics = {"fsq.fullest_bin_share": share, "fsq.fit_bin_share": baseline, "fsq.refit": refit}
    if drifted is not None:
        metrics["fsq.drifted_bin_share"] = drifted
    return fsq, z, digits, metrics


def digit_directions(residual: np.ndarray, prev_c3: np.ndarray, levels: int, dims: int) -> np.ndarray | None:
    """``(dims, dim)``: per previous FSQ coordinate, the direction of ``residual`` ``(n, dim)`` that
    goes with its digit: the covariance of the residual with the digit over the items that had a
    code (``prev_c3`` ``(n,)``, -1 for new items), normalised. In a new embedding space these stand
    in for the old principal directions, so that the new FSQ directions can take the old ones' order
    and orientation by item overlap. None with fewer than 2 coded items."""
    have = np.flatnonzero(prev_c3 >= 0)
    if len(have) < 2:
        return None
    digits = F.unpack(prev_c3[have], levels, dims).astype(np.float64)            # (m, dims)
    digits -= digits.mean(0)
    cov = np.zeros((dims, residual.shape[1]), np.float64)
    for lo in range(0, len(have), F.CHUNK):
        cov += digits[lo:lo + F.CHUNK].T @ residual[have[lo:lo + F.CHUNK]].astype(np.float64)
    norm = np.linalg.norm(cov, axis=1, keepdims=True)
    return (cov / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def carry_into_new_space(x: np.ndarray, item_ids: np.ndarray, previous: Codebook, previous_codes: pa.Table
                         ) -> Codebook:
    """The previous codebook's cells carried into the space of ``x`` ``(n, dim)`` (another embedding
    model) by their items: each level-1 centroid is the mean of the new vectors of the items the
    previous codes put in that cell, each level-2 centroid the mean of those items' residuals after
    level 1; a cell none of today's items held starts at a seeded random item. The FSQ level is left
    to fit (None). A warm start from this keeps the previous partition, and so the previous labels,
    as far as the new space allows; k-means++ would find another partition and numbering."""
    prev = _align_previous(previous_codes, item_ids)
    rng = np.random.default_rng(previous.params.seed)
    resid = np.array(x, dtype=np.float32, copy=True)
    centroids = []
    for level, k in enumerate(previous.params.levels):
        labels = prev["c12"][:, level]
        have = labels >= 0
        sums = np.zeros((k, x.shape[1]), np.float64)
        np.add.at(sums, labels[have], resid[have])
        counts = np.bincount(labels[have], minlength=k)
        c = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0.0).astype(np.float32)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            c[empty] = resid[rng.choice(len(resid), len(empty), replace=len(empty) > len(resid))]
        centroids.append(c)
        assigned = np.where(have, labels, assign(resid, c, with_dist=False)[0])
        subtract_centroids(resid, c, assigned)
    return Codebook(centroids, None, previous.params, [], "")


def _warmup_rows(p: QuantizerParams, n: int, k: int) -> int:
    """Rows of the cold fit's warm-up sample: min(warmup_sample, n / 4), and none unless that gives
    at least 64 rows per centroid (a smaller sample would not be a better start than the seeds)."""
    rows = min(p.warmup_sample, n // 4)
    return rows if rows >= 64 * k else 0


def _align_previous(previous_codes: pa.Table, item_ids: np.ndarray) -> dict[str, np.ndarray]:
    """The previous snapshot's codes, row-aligned to ``item_ids`` (-1 where an item is new)."""
    pid = previous_codes["item_id"].to_numpy()
    srt = np.argsort(pid, kind="stable")
    j = np.minimum(np.searchsorted(pid[srt], item_ids), max(len(pid) - 1, 0))
    rows = np.where((len(pid) > 0) & (pid[srt][j] == item_ids), srt[j], -1) if len(pid) else np.full(len(item_ids), -1)
    have = rows >= 0
    c12 = np.full((len(item_ids), 2), -1, np.int32)
    c3 = np.full(len(item_ids), -1, np.int64)
    suffix = np.zeros(len(item_ids), np.int64)
    resolved = np.zeros(len(item_ids), bool)
    r = rows[have]
    c12[have, 0] = previous_codes["c1"].to_numpy()[r]
    c12[have, 1] = previous_codes["c2"].to_numpy()[r]
    c3[have] = previous_codes["c3"].to_numpy()[r]
    sid_parts = [s.split("-") for s in np.asarray(previous_codes["sid"].to_pylist(), dtype=object)[r]]
    suffix[have] = [int(sp[3]) if len(sp) > 3 else 0 for sp in sid_parts]
    resolved[have] = previous_codes["resolved"].to_numpy(zero_copy_only=False)[r]
    return {"c12": c12, "c3": c3, "suffix": suffix, "resolved": resolved}


def save_codebook(codebook: Codebook, folder: str | Path) -> None:
    """Write centroids and FSQ arrays as .npy plus a JSON manifest (no pickle anywhere)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for level, c in enumerate(codebook.centroids, start=1):
        np.save(folder / f"centroids_level{level}.npy", c, allow_pickle=False)
    for name in ("mean", "components", "boundaries", "centers", "cell_means"):
        if getattr(codebook.fsq, name) is not None:
            np.save(folder / f"fsq_{name}.npy", getattr(codebook.fsq, name), allow_pickle=False)
    if codebook.input_map is not None:
        np.save(folder / "input_map.npy", codebook.input_map, allow_pickle=False)
    meta = {"format": CODEBOOK_FORMAT, "params": codebook.params.model_dump(mode="json"),
            "dim": codebook.dim, "fit_report": codebook.fit_report, "model_version": codebook.model_version,
            "fsq_fit_bin_share": codebook.fsq_fit_bin_share}
    (folder / "codebook.json").write_text(json.dumps(meta, indent=2))


def load_codebook(folder: str | Path) -> Codebook:
    folder = Path(folder)
    try:
        meta = json.loads((folder / "codebook.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(STAGE, "codebook", f"unreadable codebook at {folder}: {exc}") from None
    if meta.get("format") != CODEBOOK_FORMAT:
        raise DataError(STAGE, "codebook", f"codebook format {meta.get('format')} is not {CODEBOOK_FORMAT}")
    params = QuantizerParams(**meta["params"])
    books = [np.load(folder / f"centroids_level{i}.npy", allow_pickle=False) for i in range(1, len(params.levels) + 1)]
    fsq = F.FSQCodebook(*(np.load(folder / f"fsq_{n}.npy", allow_pickle=False)
                          for n in ("mean", "components", "boundaries", "centers")),
                        cell_means=np.load(folder / "fsq_cell_means.npy", allow_pickle=False)
                        if (folder / "fsq_cell_means.npy").is_file() else None)
    input_map = np.load(folder / "input_map.npy", allow_pickle=False) if (folder / "input_map.npy").is_file() else None
    if input_map is not None and (input_map.ndim != 2 or input_map.shape[0] < 2 or input_map.shape[1] != meta["dim"]):
        raise DataError(STAGE, "codebook", f"input_map at {folder} has shape {input_map.shape}, expected "
                                           f"(input width + 1, {meta['dim']})")
    return Codebook(books, fsq, params, meta.get("fit_report", []), meta.get("model_version", ""),
                    float(meta.get("fsq_fit_bin_share", 0.0)), input_map)
