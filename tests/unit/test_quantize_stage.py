"""quantize_stage: the refresh's choice between refit, warm start and frozen encoding."""

import numpy as np

from qarm_core.quantize.io import synthetic_embeddings
from qarm_core.quantize.quantizer import QuantizerParams
from qarm_core.quantize.stage import quantize_stage

P = QuantizerParams(levels=(8, 4), fsq_dims=2, fsq_levels=3, niter=10, seed=0)


def _x(n=600, dim=16, seed=0):
    ids, x = zip(*synthetic_embeddings(n, dim, clusters=32, seed=seed))
    return np.concatenate(ids), np.concatenate(x)


def test_modes():
    ids, x = _x()
    book, codes, m, how = quantize_stage(x.copy(), ids, P, "warm_start")
    assert how == "refit: no published codebook" and codes.num_rows == len(ids)
    # warm start on the same data keeps every SID
    _, codes2, m2, how2 = quantize_stage(x.copy(), ids, P, "warm_start", previous=book, previous_codes=codes)
    assert how2 == "warm_start" and m2["churn"] == 0.0
    assert codes2["sid"].to_pylist() == codes["sid"].to_pylist()
    # frozen: the same codebook object, codes of the same data unchanged
    book3, codes3, _, how3 = quantize_stage(x.copy(), ids, P, "frozen", previous=book, previous_codes=codes)
    assert how3 == "frozen" and book3 is book
    assert codes3["sid"].to_pylist() == codes["sid"].to_pylist()
    # refit ignores the previous codebook
    assert quantize_stage(x.copy(), ids, P, "refit", previous=book)[3] == "refit"


def test_a_codebook_that_no_longer_fits_is_refitted_with_the_reason():
    ids, x = _x()
    book, codes, _, _ = quantize_stage(x.copy(), ids, P, "refit")
    ids2, wider = _x(dim=24, seed=1)
    _, codes2, _, how = quantize_stage(wider, ids2, P, "frozen", previous=book, previous_codes=codes)
    assert how.startswith("refit: the published codebook (dim 16") and "does not fit dim 24" in how
    assert codes2.num_rows == len(ids2)
    other = QuantizerParams(levels=(4, 4), fsq_dims=2, fsq_levels=3, niter=10)
    assert quantize_stage(x.copy(), ids, other, "warm_start", previous=book)[3].startswith("refit: the published")


# ---------------------------------------------------------------- the FSQ refit policy
def test_align_components_undoes_a_reordering_and_sign_flips():
    from qarm_core.quantize.fsq import align_components

    ref = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 4)))[0].T.astype(np.float32)   # (4, 16)
    shuffled = ref[[2, 0, 3, 1]] * np.array([-1, 1, -1, 1], np.float32)[:, None]
    np.testing.assert_array_equal(align_components(shuffled, ref), ref)


def _squeeze_fsq_coordinate(x, book, codes, factor=0.1):
    """``x`` with every item's residual coordinate along the first FSQ direction scaled by
    ``factor``: the items crowd into that coordinate's middle bins (a drift of the residuals)."""
    resid = x - book.centroids[0][codes["c1"].to_numpy()] - book.centroids[1][codes["c2"].to_numpy()]
    comp = book.fsq.components[0]
    z0 = (resid - book.fsq.mean) @ comp
    return (x - (1.0 - factor) * z0[:, None] * comp[None, :]).astype(np.float32)


def test_warm_start_refits_the_fsq_level_only_when_its_bins_drift():
    import dataclasses

    ids, x = _x(n=2000)
    book, codes, m0, _ = quantize_stage(x.copy(), ids, P, "refit")
    assert m0["fsq.refit"] == 0.0 and abs(m0["fsq.fit_bin_share"] - 1 / 3) < 0.05   # quantile bins: ~1/L each
    assert book.fsq_fit_bin_share == m0["fsq.fit_bin_share"]
    # the same data: the bins still fit, nothing is refitted, nothing moves
    same_book, _, m1, how1 = quantize_stage(x.copy(), ids, P, "warm_start", previous=book, previous_codes=codes)
    assert how1 == "warm_start" and m1["fsq.refit"] == 0.0 and m1["churn"] == 0.0
    np.testing.assert_array_equal(same_book.fsq.boundaries, book.fsq.boundaries)
    # squeezed residuals: one coordinate's middle bin fills up past 1.5x its fitted share -> refit
    drifted = _squeeze_fsq_coordinate(x, book, codes)
    kept_book, _, m_off, _ = quantize_stage(drifted.copy(), ids, P.model_copy(update={"fsq_refit_drift": None}),
                                            "warm_start", previous=book, previous_codes=codes)
    assert m_off["fsq.refit"] == 0.0 and m_off["fsq.fullest_bin_share"] > 1.5 * m0["fsq.fit_bin_share"]
    new_book, _, m2, how2 = quantize_stage(drifted.copy(), ids, P, "warm_start", previous=book, previous_codes=codes)
    assert how2 == "warm_start" and m2["fsq.refit"] == 1.0
    assert m2["fsq.drifted_bin_share"] == m_off["fsq.fullest_bin_share"]
    assert m2["fsq.fullest_bin_share"] < 1.2 * m0["fsq.fit_bin_share"]             # spread evenly again
    assert new_book.fsq_fit_bin_share == m2["fsq.fit_bin_share"]
    assert 0.0 < m2["churn"] < 1.0                                                 # the refit's churn, reported
    # the refitted directions keep the old ones' order and orientation
    cos = np.sum(new_book.fsq.components * book.fsq.components, axis=1)
    assert (cos > 0).all()
    # a codebook saved before the policy (no fitted share recorded) is read as 1/levels
    legacy = dataclasses.replace(book, fsq_fit_bin_share=0.0)
    assert quantize_stage(x.copy(), ids, P, "warm_start", previous=legacy, previous_codes=codes)[2]["fsq.refit"] == 0.0


def test_the_fitted_bin_share_is_saved_with_the_codebook(tmp_path):
    from qarm_core.quantize.quantizer import load_codebook, save_codebook

    ids, x = _x()
    book, _, _, _ = quantize_stage(x.copy(), ids, P, "refit")
    save_codebook(book, tmp_path / "cb")
    assert load_codebook(tmp_path / "cb").fsq_fit_bin_share == book.fsq_fit_bin_share > 0
