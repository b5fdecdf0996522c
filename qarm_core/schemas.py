"""Declared Arrow schemas of the datasets qarm stores, with their schema versions.

A dataset's schema version changes whenever a column is added, removed or changes type; readers
refuse a snapshot whose schema version they do not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class DatasetSchema:
    name: str
    version: int
    schema: pa.Schema
    key: tuple[str, ...]
    # Columns an input file must carry; the others are optional and filled with nulls.
    required: tuple[str, ...]
    # Columns that must hold no nulls. Parquet fields are all declared nullable so that bad input
    # reaches the gate intact, and the gate (not the writer) enforces this.
    not_null: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        return self.schema.names


INTERACTIONS = DatasetSchema(
    name="interactions",
    version=1,
    schema=pa.schema([
        pa.field("user_id", pa.int64(), nullable=True),
        pa.field("item_id", pa.int64(), nullable=True),
        pa.field("ts", pa.int64(), nullable=True),        # event time, unix seconds
        pa.field("rating", pa.float32(), nullable=True),    # explicit feedback, if any
        pa.field("label", pa.int8(), nullable=True),        # implicit feedback 0/1, if any
    ]),
    key=("user_id", "item_id", "ts"),
    required=("user_id", "item_id", "ts"),
    not_null=("user_id", "item_id", "ts"),
)

# The split stage's outputs (``qarm_core.split``): the events of the training and validation periods,
# with the interactions' columns, and one row per period with its bounds and counts.
TRAIN_EVENTS = DatasetSchema("train_events", 1, INTERACTIONS.schema, key=INTERACTIONS.key,
                             required=INTERACTIONS.required, not_null=INTERACTIONS.not_null)
VALID_EVENTS = DatasetSchema("valid_events", 1, INTERACTIONS.schema, key=INTERACTIONS.key,
                             required=INTERACTIONS.required, not_null=INTERACTIONS.not_null)
_PERIODS = pa.schema([
    pa.field("period", pa.string()),      # 'train' | 'valid' | 'test'
    pa.field("start_ts", pa.int64()),     # first second of the period (null: the log's start)
    pa.field("end_ts", pa.int64()),       # first second after it (null: the log's end)
    pa.field("events", pa.int64()),
    pa.field("users", pa.int64()),
    pa.field("items", pa.int64()),
    pa.field("source", pa.string()),      # 'quantile' | 'fixed': how the cutoffs were chosen
])
PERIODS_SCHEMA = DatasetSchema("periods", 1, _PERIODS, key=("period",), required=("period", "start_ts", "end_ts"),
                               not_null=("period", "events"))

ITEMS = DatasetSchema(
    name="items",
    version=1,
    schema=pa.schema([
        pa.field("item_id", pa.int64(), nullable=True),
        pa.field("title", pa.string(), nullable=True),
        pa.field("year", pa.int32(), nullable=True),
        pa.field("tags", pa.list_(pa.string()), nullable=True),  # genres / categories
        pa.field("description", pa.string(), nullable=True),
    ]),
    key=("item_id",),
    required=("item_id", "title"),
    not_null=("item_id", "title"),
)

PAIRS = DatasetSchema(
    name="pairs",
    version=1,
    schema=pa.schema([
        pa.field("src_item", pa.int64(), nullable=True),
        pa.field("dst_item", pa.int64(), nullable=True),
        pa.field("score", pa.float64(), nullable=True),     # the miner's score (Swing score, cosine, ...)
        pa.field("source", pa.string(), nullable=True),     # 'swing' | 'u2i'
    ]),
    key=("src_item", "dst_item", "source"),
    required=("src_item", "dst_item", "score", "source"),
    not_null=("src_item", "dst_item", "score", "source"),
)

JUDGMENTS = DatasetSchema(
    name="judgments",
    version=2,
    schema=pa.schema([
        pa.field("src_item", pa.int64(), nullable=True),
        pa.field("dst_item", pa.int64(), nullable=True),
        pa.field("source", pa.string(), nullable=True),
        pa.field("model_id", pa.string(), nullable=True),       # which judge (backend + model)
        pa.field("prompt_version", pa.string(), nullable=True),
        pa.field("score", pa.float64(), nullable=True),         # judge score, higher = more related
        pa.field("keep", pa.bool_(), nullable=True),            # the per-source keep rule's verdict
        pa.field("reasoning", pa.string(), nullable=True),      # generated only where configured
        # hash of both items' texts as the judge read them: a cached score is reused only for the same text
        pa.field("text_hash", pa.string(), nullable=True),
    ]),
    key=("src_item", "dst_item", "source", "model_id", "prompt_version"),
    required=("src_item", "dst_item", "source", "model_id", "prompt_version", "score", "keep", "text_hash"),
    not_null=("src_item", "dst_item", "source", "model_id", "prompt_version", "score", "keep", "text_hash"),
)

QA = DatasetSchema(
    name="qa",
    version=2,
    schema=pa.schema([
        pa.field("item_id", pa.int64(), nullable=True),
        pa.field("qa_index", pa.int32(), nullable=True),
        pa.field("question", pa.string(), nullable=True),
        pa.field("answer", pa.string(), nullable=True),
        pa.field("model_id", pa.string(), nullable=True),
        pa.field("prompt_version", pa.string(), nullable=True),
        # hash of the item fields the questions and answers were made from: reused only for the same text
        pa.field("text_hash", pa.string(), nullable=True),
    ]),
    key=("item_id", "qa_index", "model_id", "prompt_version"),
    required=("item_id", "qa_index", "question", "answer", "model_id", "prompt_version", "text_hash"),
    not_null=("item_id", "qa_index", "question", "answer", "model_id", "prompt_version", "text_hash"),
)


JUDGE_EVAL = DatasetSchema(
    name="judge_eval",
    version=1,
    schema=pa.schema([
        pa.field("eval_set", pa.string(), nullable=True),       # 'cooc' | 'genre'
        pa.field("src_item", pa.int64(), nullable=True),
        pa.field("dst_item", pa.int64(), nullable=True),
        pa.field("label", pa.int8(), nullable=True),            # 1 related, 0 not
        pa.field("pmi", pa.float64(), nullable=True),           # the judge score's terms
        pa.field("cos", pa.float64(), nullable=True),
        pa.field("tag_cos", pa.float64(), nullable=True),
        pa.field("components_id", pa.string(), nullable=True),  # the models behind the terms
        pa.field("prompt_version", pa.string(), nullable=True),
        pa.field("text_hash", pa.string(), nullable=True),      # hash of both items' rendered text
    ]),
    key=("eval_set", "src_item", "dst_item", "components_id", "prompt_version"),
    required=("eval_set", "src_item", "dst_item", "label", "pmi", "components_id", "prompt_version", "text_hash"),
    not_null=("eval_set", "src_item", "dst_item", "label", "pmi", "components_id", "prompt_version", "text_hash"),
)

JUDGE_NEUTRAL = DatasetSchema(
    name="judge_neutral",
    version=1,
    schema=pa.schema([
        pa.field("item_id", pa.int64(), nullable=True),
        pa.field("text_hash", pa.string(), nullable=True),      # hash of the item as the LLM reads it
        pa.field("neutral", pa.float64(), nullable=True),       # log P(item | the prompt's neutral context)
        pa.field("model_id", pa.string(), nullable=True),       # the LLM (backend model id)
        pa.field("prompt_version", pa.string(), nullable=True),
    ]),
    key=("item_id", "model_id", "prompt_version"),
    required=("item_id", "text_hash", "neutral", "model_id", "prompt_version"),
    not_null=("item_id", "text_hash", "neutral", "model_id", "prompt_version"),
)


BASELINE_SCORES = DatasetSchema(
    name="baseline_scores",
    version=1,
    schema=pa.schema([
        pa.field("model", pa.string(), nullable=True),     # a baseline of embed.baselines: 'base' | 'minilm'
        pa.field("metric", pa.string(), nullable=True),    # 'recall_at_10' | 'recall_at_50' | 'mrr'
        pa.field("value", pa.float64(), nullable=True),    # on the validation period's co-occurrence
    ]),
    key=("model", "metric"),
    required=("model", "metric", "value"),
    not_null=("model", "metric", "value"),
)


def embeddings_schema(dim: int) -> DatasetSchema:
    """Item embeddings of width ``dim``: item_id, vector (fixed-size list of ``dim`` float32),
    model_version, text_hash (a hash of the text the model read; a daily run reuses a vector
    whose model version and text hash are unchanged). One row per catalog item."""
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1, got {dim}")
    return DatasetSchema(
        name="embeddings",
        version=2,
        schema=pa.schema([
            pa.field("item_id", pa.int64()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
            pa.field("model_version", pa.string()),
            pa.field("text_hash", pa.string()),        # null: not known (e.g. vectors from a file)
        ]),
        key=("item_id",),
        required=("item_id", "vector", "model_version"),
        not_null=("item_id", "vector", "model_version"),
    )


# The width is the embedding model's ``dim``; this instance (dim 128, the default) names the
# dataset and its version for readers that do not care about the width.
EMBEDDINGS = embeddings_schema(128)

CODES = DatasetSchema(
    name="codes",
    version=2,
    schema=pa.schema([
        pa.field("item_id", pa.int64()),
        pa.field("c1", pa.int32()),            # level-1 residual k-means code
        pa.field("c2", pa.int32()),            # level-2 residual k-means code
        pa.field("c3", pa.int64()),            # the FSQ digits packed
        pa.field("sid", pa.string()),          # "c1-c2-c3", plus "-k" where a collision could not be moved
        pa.field("resolved", pa.bool_()),      # c3 was moved off a colliding cell
        pa.field("c3_raw", pa.int64()),        # the FSQ code as quantised, before resolution (raw collision)
    ]),
    key=("item_id",),
    required=("item_id", "c1", "c2", "c3", "sid", "resolved"),
    not_null=("item_id", "c1", "c2", "c3", "sid", "resolved"),
)

# Stage 6: the ranking samples (one row per target event or sampled negative) and each user's
# time-ordered item sequence, built by ``rank.samples.build_samples``.
_SAMPLES = pa.schema([
    pa.field("user_id", pa.int64()),
    pa.field("item_id", pa.int64()),      # the target item
    pa.field("label", pa.int8()),         # 1 positive, 0 negative
    pa.field("pos", pa.int32()),          # events of the user before this one (history length)
    pa.field("ts", pa.int64()),
    pa.field("split", pa.string()),       # 'train' | 'valid' | 'test': the period of ts (qarm_core.split)
    pa.field("sampled", pa.bool_()),      # a sampled negative (not a rated event)
    pa.field("neg_set", pa.int16()),      # the negative set of a sampled negative; -1: a real event
])
RANK_SAMPLES = DatasetSchema("rank_samples", 2, _SAMPLES, key=("user_id", "pos", "item_id"),
                             required=tuple(_SAMPLES.names))
_SEQUENCES = pa.schema([
    pa.field("user_id", pa.int64()),
    pa.field("items", pa.list_(pa.int64())),   # the user's items ordered by (ts, item_id)
])
RANK_SEQUENCES = DatasetSchema("rank_sequences", 1, _SEQUENCES, key=("user_id",), required=tuple(_SEQUENCES.names))

SCHEMAS: dict[str, DatasetSchema] = {s.name: s for s in (INTERACTIONS, TRAIN_EVENTS, VALID_EVENTS,
                                                         PERIODS_SCHEMA, ITEMS, PAIRS, JUDGMENTS, JUDGE_EVAL,
                                                         JUDGE_NEUTRAL, QA, BASELINE_SCORES, EMBEDDINGS, CODES, RANK_SAMPLES,
                                                         RANK_SEQUENCES)}


def schema_for(dataset: str) -> DatasetSchema:
    try:
        return SCHEMAS[dataset]
    except KeyError:
        raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(SCHEMAS)}") from None
