"""Tolerances the tests compare computed numbers with, each written once with its reason."""

# A judge score is a difference of float32 log-prob sums over ~10 tokens. A cached value and one
# computed today may come from batches of other shapes, and on a CPU with only AVX2 the float32
# kernels' summation order follows the batch shape: the two then differ by ~1e-6 (up to 1.4e-6
# measured on the Xeon capped to AVX2, 2026-12-06), where AVX-512/AMX kernels happened to agree to
# the bit. A stale value (another text's log-prob) is off by far more: the tests where staleness
# is the failure to catch also check that it would be.
LOGPROB_ATOL = 1e-5
