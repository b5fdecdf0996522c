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
