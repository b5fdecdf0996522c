"""The final FSQ level: a fitted projection of the level-2 residual to ``dims`` coordinates, each
rounded to one of ``levels`` values. Two forms (``QuantizerParams.fsq_form``):

* ``pca_quantile`` (the default): W is the top ``dims`` principal directions of the residual, and
  each coordinate's L bins are cut at its empirical quantiles ("levels chosen so items spread
  evenly"): every digit value holds ~1/L of the items.
* ``sigmoid``: the paper's form, Z = round((L - 1) * sigmoid((r - mean) @ W)), with W learned on the
  level-2 residuals (``fit_fsq_sigmoid``): starting from the scaled principal directions, W and a
  linear decoder minimise the reconstruction error through the rounding (straight-through) plus a
  penalty that pulls each coordinate's sigmoid towards the uniform distribution on [0, 1], so codes
  spread evenly AND keep what the residual holds. Rounding a sigmoid is a threshold on the
  projection, so the form is stored like the other: projection rows and cut points.

Both decode a code to ``cell_means[code]``, the mean residual of the fitting items in that cell
(the MSE-optimal decoding of a given assignment, as a k-means centroid is); a cell no fitting item
reached decodes to its bin centres. The third SID code packs the digits: c3 = sum_d digit_d * L**d.

A random rotation of the top principal subspace and ITQ (Gong & Lazebnik 2011) were tried in place
of the plain principal directions on ML-100K (MiniLM, 64x64 k-means + 6 binary digits, 5 seeds):
FSQ/k-means collision ratio 0.35 and 0.36 against 0.37 for PCA, worst seed 0.52 and 0.67 against
0.58; no consistent gain, so the projection stays PCA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


CHUNK = 262_144  # rows per chunk for (rows, dim) temporaries


@dataclass(frozen=True)
class FSQCodebook:
    mean: np.ndarray         # (dim,) float32, residual mean
    components: np.ndarray   # (dims, dim) float32, projection rows (orthonormal)
    boundaries: np.ndarray   # (dims, levels - 1) float32, cut points per coordinate
    centers: np.ndarray      # (dims, levels) float32, a representative value per bin
    # (levels ** dims, dim) float32: what each cell decodes to (None: centres through the components)
    cell_means: np.ndarray | None = None

    @property
    def dims(self) -> int:
        return self.components.shape[0]

    @property
    def levels(self) -> int:
        return self.centers.shape[1]

    @property
    def code_space(self) -> int:
        return self.levels ** self.dims


def fit_fsq(residual: np.ndarray, dims: int, levels: int, *, sample: int = 500_000, seed: int = 0,
            reference: np.ndarray | None = None) -> FSQCodebook:
    """Fit the projection and the per-coordinate quantile bins on ``residual`` ``(n, dim)``.

    The projection and quantiles are estimated on at most ``sample`` rows (a seeded sample): both
    are stable statistics, and this keeps the fit O(sample) on 10M-row snapshots.
    ``reference`` ``(dims, dim)``: the components of the FSQ level being replaced; the new principal
    directions are put in its order and orientation (``align_components``), so that a refit keeps
    each digit's meaning and items that did not move keep their digits.
    """
    n, d = residual.shape
    if not 1 <= dims <= d:
        raise ValueError(f"fsq dims must be in 1..{d}, got {dims}")
    if levels < 2:
        raise ValueError(f"fsq levels must be >= 2, got {levels}")
    if dims * np.log2(levels) > 40:
        raise ValueError(f"fsq code space {levels}**{dims} is too large (> 2**40)")
    if n <= sample:
        rows = residual
    else:
        from qarm_core.quantize.kmeans import take_rows

        rows = take_rows(residual, np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)))
    # Mean in float64; covariance (dim x dim) by float32 sgemm per chunk of centred rows, summed in
    # float64: the principal directions need no more precision, and no float64 copy of rows is made.
    mean = np.zeros(d, np.float64)
    for lo in range(0, len(rows), CHUNK):
        mean += rows[lo:lo + CHUNK].sum(0, dtype=np.float64)
    mean /= len(rows)
    mean32 = mean.astype(np.float32)
    cov = np.zeros((d, d), np.float64)
    for lo in range(0, len(rows), CHUNK):
        part = rows[lo:lo + CHUNK] - mean32
        cov += part.T @ part
    cov /= max(len(rows) - 1, 1)
    w, v = np.linalg.eigh(cov)
    comps = v[:, np.argsort(w)[::-1][:dims]].T
    comps *= np.sign(comps[np.arange(dims), np.abs(comps).argmax(1)])[:, None]  # deterministic signs
    if reference is not None and reference.shape == comps.shape:
        comps = align_components(comps, reference)
    fitted = FSQCodebook(mean32, comps.astype(np.float32), np.zeros((dims, levels - 1), np.float32),
                         np.zeros((dims, levels), np.float32))
    z = project(fitted, rows).astype(np.float64)                    # the same projection as encoding
    qs = np.arange(1, levels) / levels
    boundaries = np.quantile(z, qs, axis=0).T                       # (dims, levels-1)
    centers = np.quantile(z, (np.arange(levels) + 0.5) / levels, axis=0).T
    book = FSQCodebook(mean32, comps.astype(np.float32), boundaries.astype(np.float32), centers.astype(np.float32))
    return with_cell_means(book, rows)


def align_components(comps: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``comps`` ``(dims, dim)`` reordered and sign-flipped to match ``reference`` ``(dims, dim)``:
    the one-to-one matching of rows that maximises the total |cosine| (Hungarian), each row then
    turned to point the way of its match. Principal directions with close eigenvalues swap places
    and flip signs between fits; without this, a refit would renumber every digit."""
    from scipy.optimize import linear_sum_assignment

    sim = comps.astype(np.float64) @ reference.astype(np.float64).T           # (dims new, dims ref)
    new_of, ref_of = linear_sum_assignment(-np.abs(sim))
    out = np.empty_like(comps)
    out[ref_of] = comps[new_of] * np.where(sim[new_of, ref_of] < 0, -1.0, 1.0)[:, None]
    return out


def fullest_bin_share(fsq: FSQCodebook, digits: np.ndarray) -> float:
    """The largest share of items that one bin of one coordinate holds, over ``digits`` ``(n, dims)``.
    Quantile bins hold ~1/levels each when fitted; the share grows as the residuals drift away from
    the distribution the bins were cut on (the FSQ refit policy's trigger)."""
    if len(digits) == 0:
        return 0.0
    if fsq.code_space <= 1 << 22:
        # one count per cell, then each coordinate's marginal: one pass over the packed codes where
        # a bincount per strided column read the digits once per coordinate (0.4 s at 10M rows)
        cells = np.bincount(pack(digits, fsq.levels), minlength=fsq.code_space).reshape((fsq.levels,) * fsq.dims)
        axes = range(fsq.dims)
        return max(float(cells.sum(axis=tuple(a for a in axes if a != j)).max()) for j in axes) / len(digits)
    return max(float(np.bincount(digits[:, j], minlength=fsq.levels).max()) / len(digits) for j in range(fsq.dims))


def with_cell_means(fsq: FSQCodebook, rows: np.ndarray) -> FSQCodebook:
    """``fsq`` with its decoding table: the mean of ``rows`` ``(n, dim)`` per cell they fall in; a
    cell no row reached decodes to its bin centres through the components."""
    from dataclasses import replace

    book = replace(fsq, cell_means=None)
    codes = pack(digits_of(book, project(book, rows)), book.levels)
    # float64 sums per cell in row order by the k-means sums kernel: the same sums as sorting the
    # rows by cell and reducing each run, without the sort and its (rows, dim) float64 gather
    from qarm_core.quantize.kmeans import _k

    sums = np.zeros((1, book.code_space, rows.shape[1]), np.float64)
    counts = np.zeros((1, book.code_space), np.int64)
    rows_c = np.ascontiguousarray(rows, dtype=np.float64 if rows.dtype == np.float64 else np.float32)
    for lo in range(0, len(rows_c), CHUNK):
        _k().accumulate(rows_c[lo:lo + CHUNK], codes[lo:lo + CHUNK], sums, counts, 0)
    sums, counts = sums[0], counts[0]
    table = decode(book, unpack(np.arange(book.code_space, dtype=np.int64), book.levels, book.dims))
    hit = counts > 0
    table[hit] = (sums[hit] / counts[hit, None]).astype(np.float32)
    return replace(book, cell_means=table.astype(np.float32))


def fit_fsq_sigmoid(residual: np.ndarray, dims: int, levels: int, *, sample: int = 500_000, seed: int = 0,
                    steps: int = 300, batch: int = 8192, lr: float = 0.01, uniform_weight: float = 1.0,
                    reference: np.ndarray | None = None) -> FSQCodebook:
    """The paper's form: digits = round((L - 1) * sigmoid((r - mean) @ W)), W ``(dim, dims)`` learned
    on ``residual`` ``(n, dim)`` (at most ``sample`` seeded rows) with a linear decoder, minimising
    ||r - mean - decoder(q)||^2 / total variance + ``uniform_weight`` x 12 x the squared 1-D
    Wasserstein distance of each coordinate's sigmoid to U(0, 1) (0 when uniform; 1 = as far as a
    constant), q the rounded sigmoid with a straight-through gradient. Starts from the principal
    directions scaled so that sigmoid(z) is about uniform (logistic ~ 1.7 x standard normal)."""
    import torch

    from qarm_core.quantize.kmeans import take_rows

    base = fit_fsq(residual, dims, levels, sample=sample, seed=seed, reference=reference)
    n = len(residual)
    rows = residual if n <= sample else take_rows(residual, np.sort(np.random.default_rng(seed).choice(n, sample,
                                                                                                       replace=False)))
    x = torch.from_numpy(np.ascontiguousarray(rows - base.mean, dtype=np.float32))
    z0 = x @ torch.from_numpy(base.components.T)
    scale = 1.7 / z0.std(0).clamp_min(1e-6)
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.from_numpy(base.components.T).clone() * scale)
    dec = torch.nn.Linear(dims, x.shape[1])
    with torch.no_grad():
        dec.weight.copy_(torch.from_numpy(base.components.T) / scale * 4.0)   # q in [0, 1] -> about +-2 std
        dec.bias.copy_(-dec.weight.sum(1) / 2)
    opt = torch.optim.Adam([w, *dec.parameters()], lr=lr)
    total_var = float((x ** 2).sum(1).mean())
    L1 = float(levels - 1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=g)
        xb = x[idx]
        s = torch.sigmoid(xb @ w)
        q = s + (torch.round(s * L1) / L1 - s).detach()
        recon = ((xb - dec(q)) ** 2).sum(1).mean() / total_var
        grid = (torch.arange(len(xb), dtype=torch.float32) + 0.5) / len(xb)
        unif = 12.0 * ((torch.sort(s, 0).values - grid[:, None]) ** 2).mean()
        loss = recon + uniform_weight * unif
        opt.zero_grad()
        loss.backward()
        opt.step()
    comps = w.detach().numpy().T.astype(np.float32)                     # (dims, dim)
    # round((L-1) sigmoid(u)) = k  <=>  u in [logit((k - 1/2)/(L-1)), logit((k + 1/2)/(L-1)))
    p = (np.arange(levels - 1) + 0.5) / L1
    cuts = np.log(p / (1 - p)).astype(np.float32)
    book = FSQCodebook(base.mean, comps, np.tile(cuts, (dims, 1)), np.zeros((dims, levels), np.float32))
    u = project(book, rows)
    d = digits_of(book, u)
    centers = np.array([[np.median(u[d[:, j] == k, j]) if (d[:, j] == k).any() else
                         (cuts[min(k, levels - 2)] + (1.0 if k == levels - 1 else -1.0))
                         for k in range(levels)] for j in range(dims)], np.float32)
    from dataclasses import replace

    return with_cell_means(replace(book, centers=centers), rows)


def project(fsq: FSQCodebook, residual: np.ndarray) -> np.ndarray:
    """``(n, dims)`` coordinates (residual - mean) @ components^T of ``residual`` ``(n, dim)``,
    computed as residual @ components^T - mean @ components^T (no (n, dim) temporary)."""
    out = np.empty((len(residual), fsq.dims), np.float32)
    shift = fsq.mean @ fsq.components.T
    ct = np.ascontiguousarray(fsq.components.T)
    for lo in range(0, len(residual), CHUNK):
        np.matmul(residual[lo:lo + CHUNK], ct, out=out[lo:lo + CHUNK])
        out[lo:lo + CHUNK] -= shift
    return out


def reconstruction_mse(fsq: FSQCodebook, residual: np.ndarray, digits: np.ndarray,
                       z: np.ndarray | None = None) -> float:
    """Mean squared error of decoding ``digits`` ``(n, dims)`` against ``residual`` ``(n, dim)``.

    With orthonormal components P, r - decode = (r - mean - P^T z) + P^T (z - zhat), two orthogonal
    parts, so ||r - decode||^2 = ||r - mean||^2 - ||z||^2 + ||z - zhat||^2: two O(n dim) passes, no
    decoded (n, dim) rows. ``z`` ``(n, dims)``: the projection, if already computed.
    """
    total = 0.0
    if fsq.cell_means is not None:
        from qarm_core.quantize.kmeans import _k

        # the compiled, threaded distance to each row's cell mean, summed in the kernel: no
        # (rows, dim) gather of the means and difference (3 s of a 10M-item stage), no per-row array
        means = np.ascontiguousarray(fsq.cell_means, np.float32)
        for lo in range(0, len(residual), CHUNK):
            total += _k().sq_dist_total(np.ascontiguousarray(residual[lo:lo + CHUNK], np.float32),
                                        pack(digits[lo:lo + CHUNK], fsq.levels), means)
        return total / max(len(residual), 1)
    idx = np.arange(fsq.dims)[None, :]
    m = fsq.mean.astype(np.float64)
    for lo in range(0, len(residual), CHUNK):
        r = residual[lo:lo + CHUNK]
        zc = project(fsq, r) if z is None else z[lo:lo + CHUNK]
        zhat = fsq.centers[idx, digits[lo:lo + CHUNK]]
        rr = np.einsum("ij,ij->i", r, r).astype(np.float64) - 2.0 * (r @ fsq.mean).astype(np.float64) + m @ m
        zz = (zc.astype(np.float64) ** 2).sum(1)
        total += float((rr - zz + ((zc - zhat).astype(np.float64) ** 2).sum(1)).sum())
    return max(total, 0.0) / max(len(residual), 1)


def digits_of(fsq: FSQCodebook, z: np.ndarray) -> np.ndarray:
    """``(n, dims)`` int32 bin index of each coordinate, in 0..levels-1 (the bins' searchsorted,
    compiled and threaded: a numpy searchsorted per strided column took 0.4 s at 10M rows)."""
    from qarm_core.quantize.kmeans import _k

    if z.ndim != 2 or z.shape[1] != fsq.dims:       # the kernel reads without bounds checks
        raise ValueError(f"digits_of: coordinates of shape {z.shape} for an FSQ level of {fsq.dims} dims")
    out = np.empty(z.shape, np.int32)
    _k().bin_digits(np.ascontiguousarray(z), np.ascontiguousarray(fsq.boundaries), out)
    return out


def pack(digits: np.ndarray, levels: int) -> np.ndarray:
    """``(n,)`` int64 code: sum_d digit_d * levels**d (Horner's rule over the columns; an int64
    matrix product has no BLAS and took 0.5 s at 10M rows)."""
    out = np.zeros(len(digits), np.int64)
    for j in range(digits.shape[1] - 1, -1, -1):
        out *= levels
        out += digits[:, j]
    return out


def unpack(codes: np.ndarray, levels: int, dims: int) -> np.ndarray:
    return ((codes[:, None] // levels ** np.arange(dims, dtype=np.int64)) % levels).astype(np.int32)


def decode(fsq: FSQCodebook, digits: np.ndarray) -> np.ndarray:
    """``(n, dim)`` reconstruction of the residual from its digits."""
    if fsq.cell_means is not None:
        return fsq.cell_means[pack(digits, fsq.levels)]
    z = fsq.centers[np.arange(fsq.dims)[None, :], digits]
    return z @ fsq.components + fsq.mean


def within_margin(fsq: FSQCodebook, z: np.ndarray, digits: np.ndarray, margin: float) -> np.ndarray:
    """``(n,)`` bool: every coordinate of ``z`` lies within ``margin`` bin widths of the cell
    ``digits`` (0 inside it). A bin's width is the median width of the inner bins of that coordinate."""
    if len(z) == 0:
        return np.zeros(0, bool)
    f = fsq.dims
    widths = np.median(np.diff(fsq.boundaries, axis=1), axis=1) if fsq.levels > 2 else \
        np.abs(fsq.centers[:, 1] - fsq.centers[:, 0])
    lo_b = np.concatenate([np.full((f, 1), -np.inf, np.float32), fsq.boundaries], 1)
    hi_b = np.concatenate([fsq.boundaries, np.full((f, 1), np.inf, np.float32)], 1)
    idx = np.arange(f)[None, :]
    out = np.maximum(lo_b[idx, digits] - z, 0) + np.maximum(z - hi_b[idx, digits], 0)
    return (out <= margin * widths[None, :]).all(1)


def alternatives(fsq: FSQCodebook, z: np.ndarray, digits: np.ndarray, n_alt: int) -> np.ndarray:
    """``(n, n_alt)`` packed codes of each row's next-best cells, cheapest first.

    Candidates move one coordinate, or two, by one bin; a move costs how far the coordinate is from
    the boundary it crosses (summed over the moved coordinates), so a row near a boundary moves
    cheaply. -1 pads rows with fewer valid moves than ``n_alt``.
    """
    n, f = digits.shape
    L = fsq.levels
    lo_b = np.concatenate([np.full((f, 1), -np.inf, np.float32), fsq.boundaries], 1)
    hi_b = np.concatenate([fsq.boundaries, np.full((f, 1), np.inf, np.float32)], 1)
    idx = np.arange(f)[None, :]
    cost_down = np.where(digits > 0, z - lo_b[idx, digits], np.inf)
    cost_up = np.where(digits < L - 1, hi_b[idx, digits] - z, np.inf)
    # One move per coordinate and direction: (n, 2f); then every pair of distinct coordinates.
    single_cost = np.concatenate([cost_down, cost_up], 1)
    single_delta = np.concatenate([-(L ** np.arange(f, dtype=np.int64)), L ** np.arange(f, dtype=np.int64)])
    moves_cost, moves_delta = [single_cost], [np.broadcast_to(single_delta, (n, 2 * f))]
    a, b = np.triu_indices(2 * f, k=1)
    distinct = (a % f) != (b % f)
    a, b = a[distinct], b[distinct]
    if len(a):
        moves_cost.append(single_cost[:, a] + single_cost[:, b])
        moves_delta.append(np.broadcast_to(single_delta[a] + single_delta[b], (n, len(a))))
    cost = np.concatenate(moves_cost, 1)
    delta = np.concatenate(moves_delta, 1)
    order = np.argsort(cost, axis=1, kind="stable")[:, :n_alt]
    code = pack(digits, L)[:, None] + np.take_along_axis(delta, order, 1)
    valid = np.isfinite(np.take_along_axis(cost, order, 1))
    out = np.where(valid, code, -1)
    if out.shape[1] < n_alt:
        out = np.concatenate([out, np.full((n, n_alt - out.shape[1]), -1, np.int64)], 1)
    return out
