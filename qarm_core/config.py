"""The composition root of the typed config: each stage's config lives beside its stage and is composed
here into ``PipelineConfig``, loaded from YAML.

Unknown keys and wrong types fail loudly (pydantic ``extra="forbid"``, strict types), so a typo in
a YAML file never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from qarm_core.events import EventsConfig
from qarm_core.base import DuckDBConfig, Strict
from qarm_core.embed.config import EmbedStageConfig
from qarm_core.errors import ConfigError
from qarm_core.gates import GatesConfig
from qarm_core.hashing import stable_hash
from qarm_core.ingest import IngestConfig
from qarm_core.judge.config import JudgeConfig, QAConfig
from qarm_core.pairs.config import MineConfig
from qarm_core.quantize.config import QuantizeConfig
from qarm_core.rank.config import RankConfig
from qarm_core.split import SplitConfig
from qarm_core.storage import StorageConfig


class TrackingConfig(Strict):
    # Default: sqlite:///<home>/mlflow.db; MLFLOW_TRACKING_URI in the environment wins over both.
    tracking_uri: str | None = None
    experiment: str = "qarm-codebook-refresh"
    # Default: <home>/mlartifacts.
    artifact_location: str | None = None


class FlowConfig(Strict):
    task_retries: int = Field(2, ge=0)
    task_retry_delay_seconds: float = Field(2.0, ge=0.0)
    # One refresh at a time per home (qarm_core.lease): a second one exits 2 naming the holder
    # ("fail") or waits for it up to busy_wait_s ("wait"). A holder whose heartbeat is older than
    # lease_ttl_s, or whose process is gone, is taken over.
    on_busy: Literal["fail", "wait"] = "fail"
    busy_wait_s: float = Field(3600.0, ge=0.0)
    lease_ttl_s: float = Field(120.0, ge=5.0)


class PipelineConfig(Strict):
    name: str = "ml100k"
    # QARM_HOME in the environment wins; relative paths resolve against the working directory.
    home: str = "./qarm_home"
    ingest: IngestConfig = IngestConfig()
    split: SplitConfig = SplitConfig()
    events: EventsConfig = EventsConfig()     # what counts as a positive event, for every stage
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
