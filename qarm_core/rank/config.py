"""Typed config of the ranking stage (stage 6): samples, GSU, models, training budget.

Lives in the rank package (not in ``qarm_core.config``) so that ``PipelineConfig`` only has to
import it; every model here is strict, frozen and refuses unknown keys, like the rest of the config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qarm_core.base import Strict

# The model presets the harness knows (see qarm_core.rank.models.MODEL_SPECS).
ModelName = Literal["din", "din_tags", "din_text", "sim_hard", "sim_hard_c1", "sim_soft", "ours_nosid", "ours_sid",
                    "ours_sid_vq"]
ALL_MODELS: tuple[str, ...] = ("din", "din_tags", "din_text", "sim_hard", "sim_hard_c1", "sim_soft", "ours_nosid",
                               "ours_sid", "ours_sid_vq")


class SamplesConfig(Strict):
    """How time-ordered samples are cut from the log (see qarm_core.rank.samples)."""

    long_len: int = Field(500, ge=1)          # L_long: history events the GSU searches
    short_len: int = Field(20, ge=1)          # the most recent events, attended to directly
    # Sampled negatives per positive event: random catalog items the user never interacted with,
    # sharing the positive's history and time.
    neg_per_positive: int = Field(1, ge=0)
    seed: int = 0                             # of the negative draws (each set draws with its own index)


class GSUConfig(Strict):
    """General Search Unit: which history items the ESU attends to (see qarm_core.rank.gsu)."""

    top_k: int = Field(50, ge=1)
    pca_dim: int | None = Field(64, ge=1)     # None: search with the full-width embeddings
    chunk_rows: int = Field(4096, ge=1)       # (user, target) rows per batched search
    # Items referenced by the log without an embedding: fail, or search with a zero vector
    # (such an item then ties with every other at score 0).
    missing_embedding: Literal["error", "zero"] = "error"


class ModelConfig(Strict):
    dim: int = Field(32, ge=1)                 # width of every id / code embedding
    att_hidden: int = Field(32, ge=1)          # DIN attention MLP hidden width
    mlp_hidden: list[int] = Field(default_factory=lambda: [128, 64])
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    vq_neighbours: int = Field(10, ge=1)       # QARM V1 VQ code: the item's top-k nearest items
    # Items without a code: their c1/c2/c3 take the reserved index 0 ("no code"), or the run fails.
    missing_codes: Literal["reserved", "error"] = "reserved"
    # Also add the frozen item embedding, projected to ``dim``, to the SID models' item representation.
    frozen_embedding: bool = False


class TrainConfig(Strict):
    epochs: int = Field(3, ge=1)             # at most; the epoch kept is the best on validation AUC
    batch_size: int = Field(1024, ge=1)
    # Learning rates tried for every model (the same grid for all); each model's is chosen on its
    # mean validation AUC over the seeds, then only that one is reported on test.
    lr_grid: list[float] = Field(default_factory=lambda: [1e-3, 3e-3, 1e-2], min_length=1)
    weight_decay: float = Field(0.0, ge=0.0)
    # Extra L2 on the id/code embedding rows a batch touches (DIN's mini-batch aware regulariser, simplified).
    embedding_l2: float = Field(1e-6, ge=0.0)
    # Each seed varies initialisation, dropout, shuffling AND the negatives (seed i uses negative set i).
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    num_threads: int = Field(1, ge=1)          # 1: on a shared 2-core box, 2 BLAS threads ran 3-20x slower
    eval_batch_size: int = Field(4096, ge=1)


class RankGateConfig(Strict):
    min_train_samples: int = Field(1, ge=1)
    min_test_users: int = Field(1, ge=1)      # users with both labels in validation and in test (GAUC)
    max_missing_code_share: float = Field(0.05, ge=0.0, le=1.0)


class RankConfig(Strict):
    """Stage 6: ranking (GSU/ESU) against DIN and SIM baselines."""

    models: list[ModelName] = Field(default_factory=lambda: list(ALL_MODELS))
    samples: SamplesConfig = SamplesConfig()
    gsu: GSUConfig = GSUConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    gate: RankGateConfig = RankGateConfig()
    # When neither explicit paths nor the published snapshot provide embeddings/codes: fail
    # ("error"), or embed the catalog text with MiniLM and quantize it here ("minilm").
    inputs_fallback: Literal["error", "minilm"] = "error"
    experiment: str | None = None             # MLflow experiment of rank runs (None: tracking.experiment)

    @model_validator(mode="after")
    def _check(self) -> "RankConfig":
        if not self.models or len(set(self.models)) != len(self.models):
            raise ValueError("rank.models must name each model at most once, and at least one")
        if not self.train.seeds:
            raise ValueError("rank.train.seeds needs at least one seed")
        if self.samples.short_len > self.samples.long_len:
            raise ValueError("rank.samples.short_len must not exceed long_len")
        return self
