"""Code quality of residual k-means alone against residual k-means + FSQ at equal code space.

``compare_rk_fsq`` quantizes one set of item embeddings twice: three residual k-means levels
(K1, K2, K3) and two levels (K1, K2) + an FSQ level of f digits with L levels each, where
L**f == K3, so both have the code space K1*K2*K3. It reports, for each, the raw collision rate
(before any resolution), EdgeNum, HR@1/HR@10 as the issue defines them (holders of the item's SID
ranked by similarity to the item; ~1.0 on unit-norm embeddings, see ``metrics.hit_rates``) and
decode HR@1/HR@10 (the SID's decoding searched against the whole catalog; see
``metrics.decode_hit_rates``).
"""

from __future__ import annotations

import numpy as np

from qarm_core.quantize.kmeans import fit_level, subtract_centroids
from qarm_core.quantize.metrics import collision_metrics, decode_hit_rates, hit_rates


def residual_kmeans(x: np.ndarray, levels: tuple[int, ...], seed: int = 0, niter: int = 20,
                    polish_iter: int = 10) -> tuple[np.ndarray, list[np.ndarray]]:
    """Codes ``(n, len(levels))`` int32 and centroids (per level ``(K, dim)``) of plain residual
    k-means on ``x`` ``(n, dim)`` (full batch, the same fit as the quantizer's k-means levels)."""
    residual = np.array(x, dtype=np.float32, copy=True)
    codes = np.empty((len(x), len(levels)), np.int32)
    books = []
    for level, k in enumerate(levels):
        c, labels, _, _ = fit_level(residual, k, seed=seed + level, niter=niter, polish_iter=polish_iter)
        subtract_centroids(residual, c, labels)
        codes[:, level] = labels
        books.append(c)
    return codes, books


def _keys(codes: np.ndarray, levels: tuple[int, ...]) -> np.ndarray:
    key = np.zeros(len(codes), np.int64)
    for j, k in enumerate(levels):
        key = key * k + codes[:, j]
    return key


def compare_rk_fsq(x: np.ndarray, rk_levels: tuple[int, int, int] = (16, 16, 16), fsq_dims: int = 2,
                   fsq_levels: int = 4, seed: int = 0, fsq_form: str = "pca_quantile") -> dict[str, dict[str, float]]:
    """{"rkmeans": metrics, "rkmeans+fsq": metrics} for ``x`` ``(n, dim)``, the FSQ level of form
    ``fsq_form``; raises ValueError when fsq_levels**fsq_dims != rk_levels[2] (the code spaces would differ)."""
    from qarm_core.quantize.quantizer import QuantizerParams, quantize_embeddings

    if fsq_levels ** fsq_dims != rk_levels[2]:
        raise ValueError(f"FSQ cells {fsq_levels}**{fsq_dims} != K3 = {rk_levels[2]}: code spaces differ")
    n = len(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    codes, books = residual_kmeans(x, rk_levels, seed=seed)
    keys = _keys(codes, rk_levels)

    def decode(rows: np.ndarray) -> np.ndarray:
        return sum(books[j][codes[rows, j]] for j in range(len(rk_levels)))

    rk = {k: v for k, v in collision_metrics(keys).items()}
    rk |= hit_rates(x, keys, sample=None, seed=seed)
    rk |= {k.split(".", 1)[1]: v for k, v in decode_hit_rates(x, n, {"rk": decode}, sample=None, seed=seed).items()}
    rk["mse"] = float(((x - decode(np.arange(n))) ** 2).sum(1).mean())

    params = QuantizerParams(levels=rk_levels[:2], fsq_dims=fsq_dims, fsq_levels=fsq_levels, seed=seed,
                             hr_sample=n, decode_hr_sample=n, fsq_form=fsq_form)
    _, table, m = quantize_embeddings(x, np.arange(n, dtype=np.int64), params)
    fsq = {k.split(".", 1)[1]: v for k, v in m.items() if k.startswith("raw.")}
    fsq["mse"] = m["level3.mse"]
    fsq["resolved_collision_rate"] = m["resolved.collision_rate"]
    fsq["suffixed_share"] = m["suffixed_share"]
    return {"rkmeans": rk, "rkmeans+fsq": fsq}


# Sizing for a catalog of n items, in the paper's proportions (QARM V2: K = 8192 per level for
# >10M items, so the first two levels alone have far more cells than items, and an FSQ level of
# 13 binary digits, 2**13 = K cells): K per level = the power of two >= sqrt(2 n) (K1*K2 >= 2n),
# and FSQ = log2(K) binary digits, so both variants have the code space K**3.
def catalog_sizing(n: int) -> tuple[tuple[int, int, int], int, int]:
    """((K, K, K), fsq_dims, fsq_levels) for a catalog of ``n`` items; 1,682 items -> K = 64, 6 x 2."""
    k = 1 << int(np.ceil(np.log2(max(np.sqrt(2.0 * n), 2.0))))
    return (k, k, k), int(np.log2(k)), 2


def ml100k_minilm_embeddings(wheel: str, cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(item ids, embeddings ``(1682, 384)`` unit-norm float32, model id) of the ML-100K item texts
    with all-MiniLM-L6-v2 (``lm.sentence``; the titles as ML-100K writes them, "Usual Suspects, The");
    cached as .npy in ``cache_dir`` under a hash of the texts and the model id."""
    import hashlib
    from pathlib import Path

    from qarm_core.ingest import read_ml100k
    from qarm_core.lm.sentence import SentenceEmbedder
    from qarm_core.lm.text import ItemTextFormat, item_text

    _, items = read_ml100k(wheel)
    ids, texts = item_text(items, ItemTextFormat(uninvert_articles=False))
    model_id = "minilm-l6-v2"
    key = hashlib.sha256(("\n".join(texts) + "|" + model_id).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"ml100k_{model_id}_{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return ids, np.load(path, allow_pickle=False), model_id
    x = SentenceEmbedder().embed(texts).astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, x, allow_pickle=False)
    return ids, x, model_id
