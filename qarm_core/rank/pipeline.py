"""The ranking stage end to end as library calls (the flow, the CLI and the benchmark use these):
load embeddings/codes, build samples, gate them, prepare arrays, compare models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from qarm_core.events import POSITIVE_MIN_RATING
from qarm_core.base import DuckDBConfig
from qarm_core.errors import DataError
from qarm_core.rank.config import RankConfig
from qarm_core.rank.data import RankData, build_index, prepare
from qarm_core.rank.inputs import ItemIndex, read_table
from qarm_core.rank.models import resolve_spec
from qarm_core.rank.samples import Samples, build_samples
from qarm_core.split import Cutoffs

STAGE = "rank"


@dataclass
class ItemInputs:
    embeddings: tuple[np.ndarray, np.ndarray] | None    # (item_ids (n,), vectors (n, d))
    codes: pa.Table | None
    source: str                                          # where they came from (for the run's params)


def needs(models: list[str], frozen_embedding: bool = False) -> tuple[bool, bool]:
    """(needs embeddings, needs codes) for these models."""
    specs = [resolve_spec(m, frozen_embedding) for m in models]
    emb = any(s.gsu == "embedding" or s.vq or s.frozen_embedding for s in specs)
    codes = any(s.sids or s.retrieval == "hard:c1" for s in specs)
    return emb, codes


def load_item_inputs(embeddings_path: str | Path | None, codes_path: str | Path | None,
                     source: str = "paths") -> ItemInputs:
    """Read embeddings (item_id, vector) and codes (item_id, c1, c2, c3) Parquet, either may be None."""
    emb = None
    if embeddings_path is not None:
        from qarm_core.quantize.io import read_embeddings
        try:
            emb = read_embeddings(embeddings_path)
        except DataError as exc:   # re-label: the rank stage is the one that failed
            raise DataError(STAGE, "embeddings", exc.problem) from None
    codes = read_table(codes_path, "codes", ["item_id", "c1", "c2", "c3"]) if codes_path is not None else None
    return ItemInputs(emb, codes, source)


def build(interactions: pa.Table, items: pa.Table | None, cfg: RankConfig, duck: DuckDBConfig,
          temp_dir: str | Path, cutoffs: Cutoffs, min_rating: float = POSITIVE_MIN_RATING) -> tuple[ItemIndex, Samples]:
    index = build_index(interactions, items)
    return index, build_samples(interactions, index, cfg.samples, duck, temp_dir, cutoffs,
                                negative_sets=len(cfg.train.seeds), min_rating=min_rating)


def prepare_data(samples: Samples, index: ItemIndex, inputs: ItemInputs, items: pa.Table | None,
                 cfg: RankConfig, models: list[str] | None = None) -> RankData:
    return prepare(samples, index, cfg, embeddings=inputs.embeddings, codes=inputs.codes, items=items,
                   models=models)
