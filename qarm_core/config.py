"""Typed pipeline config: one model per stage, composed into ``PipelineConfig`` and loaded from YAML.

Unknown keys and wrong types fail loudly (pydantic ``extra="forbid"``, strict types), so a typo in
a YAML file never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qarm_core.errors import ConfigError
from qarm_core.embed.config import EmbedConfig, EmbedModelConfig, TrainConfig
from qarm_core.judge.config import JudgeConfig, QAConfig
from qarm_core.rank.config import RankConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ML100KSource(_Strict):
    recbole_version: str = "1.2.1"
    # Where the downloaded recbole wheel is kept; default: <home>/cache/recbole.
    cache_dir: str | None = None


class FilesSource(_Strict):
    interactions: str | None = None
    items: str | None = None
    # CSV only: the field separator (Parquet files carry their own schema).
    csv_delimiter: str = ","


class SynthSource(_Strict):
    users: int = Field(1_000, ge=1)
    items: int = Field(5_000, ge=1)
    interactions: int = Field(100_000, ge=1)
    seed: int = 0
    zipf_exponent: float = Field(1.1, gt=0.0)


class IngestConfig(_Strict):
    source: Literal["ml100k", "files", "synth"] = "ml100k"
    ml100k: ML100KSource = ML100KSource()
    files: FilesSource = FilesSource()
    synth: SynthSource = SynthSource()

    @model_validator(mode="after")
    def _files_given(self) -> "IngestConfig":
        if self.source == "files" and not (self.files.interactions and self.files.items):
            raise ValueError("ingest.source is 'files' but ingest.files.interactions and "
                             "ingest.files.items are not both set")
        return self


class StorageConfig(_Strict):
    # Number of published snapshots kept, the current one included.
    retention: int = Field(5, ge=1)
    # Staged stage outputs (the rerun cache) older than this are deleted after a publish.
    work_ttl_hours: float = Field(72.0, ge=0.0)


_SIZE = r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$"


class DuckDBConfig(_Strict):
    memory_limit: str = Field("4GB", pattern=_SIZE)
    max_temp_directory_size: str = Field("20GB", pattern=_SIZE)
    threads: int = Field(2, ge=1)


class RowBounds(_Strict):
    min_rows: int = Field(1, ge=0)
    max_rows: int = Field(1_000_000_000, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "RowBounds":
        if self.min_rows > self.max_rows:
            raise ValueError(f"min_rows ({self.min_rows}) > max_rows ({self.max_rows})")
        return self


class InteractionGate(RowBounds):
    rating_min: float = 0.0
    rating_max: float = 5.0
    # Earliest and latest plausible event time (unix seconds); catches ms-vs-s unit mix-ups.
    ts_min: int = 0
    ts_max: int = 4_102_444_800  # 2100-01-01


class ItemGate(RowBounds):
    max_title_chars: int = Field(1_000, ge=1)


class QAGate(RowBounds):
    # A sanity bound, independent of the generator's own cut (qa.max_answer_chars).
    max_text_chars: int = Field(1_000, ge=1)


class EmbeddingsGate(RowBounds):
    norm_tolerance: float = Field(1e-3, gt=0.0)   # | ||v|| - 1 | allowed (vectors are L2-normalised)


class CodesGate(RowBounds):
    # Share of items whose (c1, c2, c3) is shared with another item, after collision resolution.
    max_collision_rate: float = Field(0.05, ge=0.0, le=1.0)


class GatesConfig(_Strict):
    interactions: InteractionGate = InteractionGate()
    items: ItemGate = ItemGate()
    pairs: RowBounds = RowBounds()
    judgments: RowBounds = RowBounds()
    qa: QAGate = QAGate()
    embeddings: EmbeddingsGate = EmbeddingsGate()
    codes: CodesGate = CodesGate()
    # Rows per batch handed to Great Expectations; keyed and table-level checks run in DuckDB.
    batch_rows: int = Field(2_000_000, ge=1)
    sample_rows: int = Field(5, ge=1)


class SwingConfig(_Strict):
    """Swing item-to-item mining (see qarm_core.pairs.swing for the formula)."""

    alpha1: float = Field(15.0, ge=0.0)
    alpha2: float = Field(0.0, ge=0.0)
    beta: float = Field(0.3, ge=0.0)
    max_users_per_item: int = Field(1000, ge=2)
    min_user_items: int = Field(2, ge=1)
    max_user_items: int = Field(1000, ge=1)
    top_k: int = Field(100, ge=1)
    seed: int = 0

    def params(self):
        from qarm_core.pairs.swing import SwingParams
        return SwingParams(**self.model_dump())


class TwoTowerConfig(_Strict):
    """Two-tower user-to-item mining (see qarm_core.pairs.two_tower)."""

    dim: int = Field(64, ge=1)
    hidden: int = Field(128, ge=1)
    history_len: int = Field(50, ge=1)
    recency_half_life: float = Field(5.0, ge=0.0)
    text_buckets: int = Field(1 << 15, ge=1)
    max_tokens: int = Field(24, ge=1)
    positive_min_rating: float = 4.0
    temperature: float = Field(0.02, gt=0.0)
    logq_correction: bool = True
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(512, ge=2)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    window_events: int = Field(1, ge=1)
    top_m: int = Field(5, ge=1)
    # the most recent training samples only (None: all): bounds training on a large daily log
    max_train_samples: int | None = Field(None, ge=2)
    seed: int = 0
    num_threads: int = Field(1, ge=1)
    recall_k: int = Field(50, ge=1)

    def params(self):
        from qarm_core.pairs.two_tower import TwoTowerParams
        return TwoTowerParams(**self.model_dump(exclude={"recall_k"}))


class MineConfig(_Strict):
    """Stage 1: which miners run and on which events."""

    sources: list[Literal["swing", "u2i"]] = Field(default_factory=lambda: ["swing"])
    # Events that count as a positive interaction: rating >= min_rating where a rating is given,
    # else label == 1. None: every event counts.
    min_rating: float | None = None
    swing: SwingConfig = SwingConfig()
    u2i: TwoTowerConfig = TwoTowerConfig()

    @model_validator(mode="after")
    def _some_source(self) -> "MineConfig":
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError("mine.sources must name each miner at most once, and at least one")
        return self


class EmbedStageConfig(_Strict):
    """Stages 3-4: fine-tune the three-segment LLM on the kept pairs + QA, embed the catalog."""

    model: EmbedModelConfig = EmbedModelConfig()
    train: TrainConfig = TrainConfig()
    infer: EmbedConfig = EmbedConfig()
    # The daily schedule's mode: embed with the published model and train only if there is none.
    reuse_model: bool = False
    # Also embed the catalog with these and evaluate them on the held-out pairs (logged, not published).
    baselines: list[Literal["base", "minilm"]] = Field(default_factory=lambda: ["base", "minilm"])
    eval_k: int = Field(10, ge=1)


class QuantizeConfig(_Strict):
    """Stage 5: two residual k-means levels + an FSQ level -> SIDs (c1, c2, c3)."""

    levels: list[int] = Field(default_factory=lambda: [256, 256])
    fsq_dims: int = Field(4, ge=1)
    fsq_levels: int = Field(4, ge=2)
    niter: int = Field(20, ge=1)
    seed: int = 0
    resolve: bool = True
    # refit: fit from scratch; warm_start: refit starting from the published codebook, matched to
    # its indices (SIDs stay stable; the default); frozen: encode with the published codebook only.
    # Without a published codebook, warm_start and frozen fit from scratch.
    mode: Literal["refit", "warm_start", "frozen"] = "warm_start"

    @model_validator(mode="after")
    def _valid(self) -> "QuantizeConfig":
        self.params()
        return self

    def params(self):
        """The quantizer's ``QuantizerParams`` (raises ValueError on an impossible code space)."""
        from qarm_core.quantize.quantizer import QuantizerParams

        return QuantizerParams(levels=tuple(self.levels), fsq_dims=self.fsq_dims, fsq_levels=self.fsq_levels,
                               niter=self.niter, seed=self.seed, resolve=self.resolve)


class TrackingConfig(_Strict):
    # Default: sqlite:///<home>/mlflow.db; MLFLOW_TRACKING_URI in the environment wins over both.
    tracking_uri: str | None = None
    experiment: str = "qarm-codebook-refresh"
    # Default: <home>/mlartifacts.
    artifact_location: str | None = None


class FlowConfig(_Strict):
    task_retries: int = Field(2, ge=0)
    task_retry_delay_seconds: float = Field(2.0, ge=0.0)


class PipelineConfig(_Strict):
    name: str = "ml100k"
    # QARM_HOME in the environment wins; relative paths resolve against the working directory.
    home: str = "./qarm_home"
    ingest: IngestConfig = IngestConfig()
    storage: StorageConfig = StorageConfig()
    duckdb: DuckDBConfig = DuckDBConfig()
    mine: MineConfig = MineConfig()
    judge: JudgeConfig = JudgeConfig()
    qa: QAConfig = QAConfig()
    embed: EmbedStageConfig = EmbedStageConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    gates: GatesConfig = GatesConfig()
    tracking: TrackingConfig = TrackingConfig()
    flow: FlowConfig = FlowConfig()
    rank: RankConfig = RankConfig()

    def resolved(self) -> "PipelineConfig":
        """The config with environment overrides applied and every path made absolute."""
        home = Path(os.environ.get("QARM_HOME") or self.home).expanduser().resolve()
        tracking_uri = (os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.tracking_uri
                        or f"sqlite:///{home / 'mlflow.db'}")
        artifacts = self.tracking.artifact_location or (home / "mlartifacts").as_uri()
        ml100k_cache = self.ingest.ml100k.cache_dir or str(home / "cache" / "recbole")
        files = self.ingest.files.model_copy(update={
            k: str(Path(v).expanduser().resolve()) for k, v in
            (("interactions", self.ingest.files.interactions), ("items", self.ingest.files.items)) if v
        })
        ingest = self.ingest.model_copy(update={
            "ml100k": self.ingest.ml100k.model_copy(update={"cache_dir": str(Path(ml100k_cache).resolve())}),
            "files": files,
        })
        tracking = self.tracking.model_copy(update={"tracking_uri": tracking_uri,
                                                   "artifact_location": artifacts})
        return self.model_copy(update={"home": str(home), "ingest": ingest, "tracking": tracking})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        return stable_hash(self.to_dict())


def stable_hash(obj: Any) -> str:
    """Short content hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(blob, digest_size=10).hexdigest()


def _apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Apply dotted-key overrides, e.g. ``{"ingest.source": "synth"}``."""
    out = json.loads(json.dumps(data))
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def parse_config(data: dict | None, source: str = "<dict>",
                 overrides: dict[str, Any] | None = None) -> PipelineConfig:
    data = _apply_overrides(data or {}, overrides or {})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "<top>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"  - {where}: {msg}")
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(problems)) from None


EXTENDS = "extends"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so a second ``gates:`` block would wipe out the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as exc:
        raise ConfigError(f"config {p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {p} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config {p}: the top level must be a mapping, got {type(data).__name__}")
    return data or {}


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_data(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping of ``path`` with its ``extends:`` chain resolved. ``extends: other.yaml``
    (relative to the file) takes that config as the base and overrides it key by key, so a
    variant (a GPU profile, a bigger catalog) states only what differs."""
    p = Path(path).resolve()
    if p in _chain:
        raise ConfigError(f"config {p}: extends forms a cycle ({' -> '.join(str(c) for c in (*_chain, p))})")
    data = _read_yaml(p)
    parent = data.pop(EXTENDS, None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"config {p}: {EXTENDS} must be a file name, got {type(parent).__name__}")
    return _merge(read_config_data(p.parent / parent, (*_chain, p)), data)


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a pipeline config from YAML (following ``extends:``); ``overrides`` are dotted keys
    applied before validation."""
    return parse_config(read_config_data(path), source=str(path), overrides=overrides)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
