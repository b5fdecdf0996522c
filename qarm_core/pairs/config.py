"""Typed configs of stage 1: which miners run, on which events, and each miner's settings."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from qarm_core.base import Strict


class SwingConfig(Strict):
    """Swing item-to-item mining (see ``pairs.swing`` for the formula); the one place its defaults live."""

    alpha1: float = Field(15.0, ge=0.0)
    alpha2: float = Field(0.0, ge=0.0)
    beta: float = Field(0.3, ge=0.0)
    max_users_per_item: int = Field(1000, ge=2)   # users sampled per item (seeded), bounds the pair loop
    min_user_items: int = Field(2, ge=1)
    max_user_items: int = Field(1000, ge=1)       # users with more events are dropped (crawlers, shared accounts)
    top_k: int = Field(100, ge=1)
    # Stable neighbour lists (None: each refresh keeps its top_k afresh). A pair the published
    # snapshot mined stays while it ranks within keep_published_depth x top_k of its source item's
    # neighbours today, in place of a newcomer to the top_k: a day's small score changes then do
    # not swap near-tied neighbours, so the judge scores fewer new pairs and training sees steadier
    # pairs. Mining then scores that many neighbours per item (the candidates).
    keep_published_depth: float | None = Field(None, ge=1.0, allow_inf_nan=False)
    seed: int = 0

    @model_validator(mode="after")
    def _ordered(self) -> "SwingConfig":
        if self.min_user_items > self.max_user_items:
            raise ValueError(f"swing: need min_user_items ({self.min_user_items}) <= "
                             f"max_user_items ({self.max_user_items})")
        return self

    @property
    def candidates_k(self) -> int:
        """Neighbours scored per source item: ``top_k``, or ``ceil(keep_published_depth * top_k)``."""
        return self.top_k if self.keep_published_depth is None else math.ceil(self.keep_published_depth * self.top_k)


class TwoTowerConfig(Strict):
    """Two-tower user-to-item mining (see ``pairs.two_tower``): model, training and mining settings.
    The defaults train on ML-100K in about 20 s (1 thread)."""

    dim: int = Field(64, ge=1)                    # output embedding size of both towers
    hidden: int = Field(128, ge=1)                # id/text embedding and MLP width
    history_len: int = Field(50, ge=1)            # most recent events the user tower sees
    # history weight halves every this many events (0: plain mean)
    recency_half_life: float = Field(5.0, ge=0.0, allow_inf_nan=False)
    text_buckets: int = Field(1 << 15, ge=1)      # hash buckets of the title/tag bag of words
    max_tokens: int = Field(24, ge=1)             # tokens kept per item (title words first, then tags)
    temperature: float = Field(0.02, gt=0.0)
    logq_correction: bool = True
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(512, ge=2)            # >= 2: the other rows are the in-batch negatives
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    window_events: int = Field(1, ge=1)           # latest window for u2i mining: last N positive events per user
    top_m: int = Field(5, ge=1)                   # pairs per (user, target)
    # Train on at most this many of the most recent training samples (None: all). Bounds a daily
    # run's training cost on a large log: one epoch over 10M events takes minutes on 2 cores.
    max_train_samples: int | None = Field(None, ge=2)
    seed: int = 0
    # torch threads. 1 by default: the per-batch ops are too small to gain from a second thread,
    # and on a shared 2-core CPU OpenMP's spin-waiting made 2 threads 5-10x slower (measured).
    num_threads: int = Field(1, ge=1)
    recall_k: int = Field(50, ge=1)               # recall@k of the mined pairs, reported
    # recall@k is measured on a seeded sample of at most this many held-out users (None: all): an
    # exhaustive search of 100k users over 1M items was the longest part of mining at that scale,
    # and 20k users measure a recall to +-0.007 (95% CI). Reported with the sample size and CI.
    recall_max_users: int | None = Field(20_000, ge=1)
    # Mine with the published towers instead of training (the daily schedule; the weekly retrain
    # trains): towers trained under other settings (two_tower.MODEL_FIELDS), or none published, train.
    reuse_model: bool = False


class MineConfig(Strict):
    """Stage 1: which miners run and on which events."""

    sources: list[Literal["swing", "u2i"]] = Field(default_factory=lambda: ["swing"])
    # Which events count as positives is the pipeline's one rule: ``events.positive_min_rating``.
    swing: SwingConfig = SwingConfig()
    u2i: TwoTowerConfig = TwoTowerConfig()

    @model_validator(mode="after")
    def _some_source(self) -> "MineConfig":
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError("mine.sources must name each miner at most once, and at least one")
        return self
