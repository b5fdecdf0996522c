"""Typed settings of stage 5 (Semantic IDs): the quantizer's parameters, and the stage's config
(the parameters plus how a refresh treats the published codebook). Each default is written here once."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from qarm_core.base import Strict


class QuantizerParams(Strict):
    """Two residual k-means levels + an FSQ level -> SIDs (c1, c2, c3)."""

    # K per residual k-means level; a YAML list is accepted
    levels: tuple[int, ...] = Field((256, 256), strict=False)
    fsq_dims: int = Field(4, ge=1)
    fsq_levels: int = Field(4, ge=2)
    # pca_quantile: principal directions cut at quantiles; sigmoid: the paper's round(L sigmoid(r W))
    # with W learned (quantize/fsq.py)
    fsq_form: Literal["pca_quantile", "sigmoid"] = "pca_quantile"
    niter: int = Field(20, ge=1)
    polish_iter: int = Field(10, ge=0)
    # Lloyd passes of a warm start (the daily run) from the published centroids. Each pass moves the
    # cells towards the day's items, and items near a boundary change code with them: in
    # benchmarks/bench_sid_stability.py (50k items, +1%/day) 10 passes moved up to 6% of the SIDs
    # in a day; see the README for the measured choice.
    warm_iter: int = Field(1, ge=1)
    seed: int = 0
    resolve: bool = True                            # move colliding items to free FSQ codes
    max_alternatives: int = Field(32, ge=1)         # candidate FSQ cells tried per colliding item
    # warm start: keep an old code while within this share of the best distance (0.05 and one warm
    # Lloyd pass: <= 0.5% daily churn in bench_sid_stability.py vs 6% at 0.01 and 10 passes, at the
    # same collision and decode HR@1; README "Stable SIDs")
    stickiness: float = Field(0.05, ge=0.0)
    fsq_margin: float = Field(0.5, ge=0.0)          # warm start: keep an old FSQ cell if within this many bin widths
    # FSQ refit policy (warm start): the published FSQ level is kept while its bins still fit, and
    # refitted (directions aligned to the old ones) when some coordinate's fullest bin holds more
    # than this many times the share it held when the bins were cut (quantile bins: ~1/levels):
    # the residuals drifted and that bin lumps items together. None: never refit on warm start.
    fsq_refit_drift: float | None = Field(1.5, gt=1.0)
    # A new embedding model (the weekly retrain) with the previous codes: ``carry`` carries the cells
    # into the new space by their items, refits and matches the labels; ``reproject`` maps its vectors
    # onto the previous codebook's space (affine least squares over up to ``reproject_sample`` items
    # both models embedded; the map is kept in the codebook and applied to that model's vectors from
    # then on) and refits from the previous codebook to convergence. On five real ML-100K retrains
    # reproject renumbered fewer SIDs (0.32-0.95 vs 0.87-1.00), but on the one that learned (800 steps,
    # the weekly budget) it kept 5% more SIDs at decode HR@1 0.65 vs 0.86 carried over, so carry stays
    # the default (README "Re-projecting a retrained model").
    lineage: Literal["carry", "reproject"] = "carry"
    reproject_sample: int = Field(100_000, ge=1)
    warmup_sample: int = Field(500_000, ge=0)       # cold fit: Lloyd on min(this, n/4) sampled rows first (0: off)
    hr_sample: int = Field(20_000, ge=0)            # query items for HR@k
    decode_hr_sample: int = Field(1000, ge=0)       # query items for decode HR@k (each scans the catalog)

    @model_validator(mode="after")
    def _code_space(self) -> "QuantizerParams":
        if len(self.levels) != 2:
            raise ValueError("quantize: SIDs are (c1, c2, c3): exactly two k-means levels")
        if any(k < 2 for k in self.levels):
            raise ValueError(f"quantize: every k-means level needs K >= 2, got {self.levels}")
        space = math.prod(float(k) for k in self.levels) * float(self.fsq_levels) ** self.fsq_dims
        if space >= 2.0 ** 62:
            raise ValueError(f"quantize: total code space {space:.3g} does not fit in int64")
        return self

    @property
    def code_sizes(self) -> tuple[int, int, int]:
        """How many values each code of a SID (c1, c2, c3) can take: the two k-means levels' K and
        the FSQ level's ``fsq_levels ** fsq_dims``."""
        return (int(self.levels[0]), int(self.levels[1]), int(self.fsq_levels) ** self.fsq_dims)


class QuantizeConfig(QuantizerParams):
    """Stage 5's config: the quantizer's parameters and the codebook mode of a refresh."""

    # refit: fit from scratch; warm_start: refit starting from the published codebook, matched to
    # its indices (SIDs stay stable; the default); frozen: encode with the published codebook only.
    # Without a published codebook, warm_start and frozen fit from scratch.
    mode: Literal["refit", "warm_start", "frozen"] = "warm_start"

    def params(self) -> QuantizerParams:
        """The quantizer's parameters (everything but ``mode``)."""
        return QuantizerParams(**self.model_dump(exclude={"mode"}))
