"""The composition root of the typed config: each stage's config lives beside its stage and is composed
here into ``PipelineConfig``, loaded from YAML.

Unknown keys and wrong types fail loudly (pydantic ``extra="forbid"``, strict types), so a typo in
a YAML file never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_serializer, field_validator

from qarm_core.events import EventsConfig
from qarm_core.base import DuckDBConfig, Strict
from qarm_core.embed.config import EmbedStageConfig
from qarm_core.errors import ConfigError
from qarm_core.executor import ExecutorConfig
from qarm_core.gates import GatesConfig
from qarm_core.hashing import stable_hash
from qarm_core.ingest import IngestConfig
from qarm_core.judge.config import JudgeConfig, QAConfig
from qarm_core.pairs.config import MineConfig
from qarm_core.quantize.config import QuantizeConfig
from qarm_core.rank.config import RankConfig
from qarm_core.split import SplitConfig
from qarm_core.storage import StorageConfig, is_remote_home, local_root


def _uri_parts(uri: str) -> tuple[str, str, str, str]:
    """(``scheme://``, user info, host[:port], the rest) of ``uri``, cut as text; a URI without
    ``://`` (a path, ``databricks``) has no authority: ("", "", "", uri)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "", "", "", uri
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, _, host = rest[:end].rpartition("@")
    return scheme + sep, userinfo, host, rest[end:]


def uri_userinfo(uri: str) -> str:
    """The ``user:password`` of ``uri`` (empty when it has none)."""
    return _uri_parts(uri)[1]


def redact_uri(uri: str) -> str:
    """``uri`` as it may be logged, printed or written: without user info (``user:password@``), query
    or fragment (``?token=...``); returned unchanged when it has none of them (the judge's HTTP URLs
    use it too). It edits the text rather than rebuilding it from its parts, so
    that a URI with nothing to hide stays byte for byte as given (``sqlite:////abs/mlflow.db`` keeps
    its four slashes, ``http://[::1]:5000`` its brackets) and the config's fingerprint does not move."""
    prefix, _, host, tail = _uri_parts(uri)
    for mark in "?#":
        tail = tail.split(mark, 1)[0]
    return prefix + host + tail


def scrub_credentials(text: str, uri: str | None) -> str:
    """``text`` (an error message, say) without the user info of ``uri`` wherever it appears:
    MLflow's own messages quote the tracking URI it was given ("API request to http://... failed")."""
    userinfo = uri_userinfo(uri) if uri else ""
    return text.replace(userinfo + "@", "") if userinfo else text


TRACKING_CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                           "in the environment")


class TrackingConfig(Strict):
    """Where MLflow records runs. The config is logged to MLflow, written as resolved.yaml and
    printed, so its URIs carry no credentials: a config that gives some is refused, and one that
    comes from MLFLOW_TRACKING_URI is kept for MLflow but serialised without them (``redact_uri``)."""

    # Default: sqlite:///<home>/mlflow.db; MLFLOW_TRACKING_URI in the environment wins over both.
    tracking_uri: str | None = None
    experiment: str = "qarm-codebook-refresh"
    # Default: <home>/mlartifacts.
    artifact_location: str | None = None
    # Where the MLflow UI serves this store, for links from Prefect (default: the tracking URI when it
    # is http(s), else http://127.0.0.1:5000, what `make mlflow-ui` serves).
    ui_url: str | None = None
    # Log the refresh's plots (codes per level, judge scores per source, training loss) on its
    # parent run: 1-4 s a refresh on 2 cores, which the test suite's many tiny refreshes skip.
    plots: bool = True

    @field_validator("tracking_uri", "ui_url")
    @classmethod
    def _no_credentials_in_uri(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or not uri_userinfo(v):
            return v
        if info.field_name == "ui_url":
            raise ValueError("the URL carries credentials (user:password@), and qarm prints it in every run's "
                             "link; give it without them")
        raise ValueError(f"the URI carries credentials (user:password@), which would be logged to MLflow and "
                         f"printed; give it without them and set {TRACKING_CREDENTIAL_ENV} (a database store's "
                         "URI may be given whole in MLFLOW_TRACKING_URI: qarm only ever shows it redacted)")

    @field_serializer("tracking_uri", "ui_url", "artifact_location", when_used="json-unless-none")
    def _without_credentials(self, v: str) -> str:
        return redact_uri(v)


class FlowConfig(Strict):
    task_retries: int = Field(2, ge=0)
    task_retry_delay_seconds: float = Field(2.0, ge=0.0)
    # One refresh at a time per home (qarm_core.lease): a second one exits 2 naming the holder
    # ("fail") or waits for it up to busy_wait_s ("wait"). A holder whose heartbeat is older than
    # lease_ttl_s, or whose process is gone, is taken over.
    on_busy: Literal["fail", "wait"] = "fail"
    busy_wait_s: float = Field(3600.0, ge=0.0)
    lease_ttl_s: float = Field(120.0, ge=5.0)
    # What the weekly-retrain deployment sets on top of this config besides continuing the published
    # model (deployments/definitions.py): dotted keys as --set takes them, e.g. a training budget
    # larger than a daily refresh's. Checked against the config when the deployments are built.
    retrain_overrides: dict[str, Any] = Field(default_factory=dict)


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
    executor: ExecutorConfig = ExecutorConfig()   # where the LLM stages' shards run (local | dask)

    def resolved(self) -> "PipelineConfig":
        """The config with environment overrides applied and every path made absolute."""
        given = os.environ.get("QARM_HOME") or self.home
        # an s3:// home stays a URL; its local state (MLflow's default store included) lives in local_root
        local = local_root(given)
        home = given.rstrip("/") if is_remote_home(given) else local
        tracking_uri = (os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.tracking_uri
                        or f"sqlite:///{local / 'mlflow.db'}")
        artifacts = self.tracking.artifact_location or (local / "mlartifacts").as_uri()
        ml100k_cache = self.ingest.ml100k.cache_dir or str(local / "cache" / "recbole")
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
        if self.executor.scratch == "object_store" and not is_remote_home(home):
            raise ConfigError(f"executor.scratch: object_store needs an s3:// home, but the home is {home} "
                              "(a folder: its workers must share it; use scratch: shared or auto)")
        return self.model_copy(update={"home": str(home), "ingest": ingest, "tracking": tracking})

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, as it is logged to MLflow, written (resolved.yaml, the snapshot
        manifest) and printed: its URIs without credentials (``TrackingConfig``), so not a way to
        hand the live config on."""
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
                 overrides: dict[str, Any] | None = None,
                 config_file: str | os.PathLike | None = None) -> PipelineConfig:
    """Validate ``data`` with ``overrides`` (dotted keys) applied. ``source`` names the config in
    errors; ``config_file``: the file ``data`` was read from, to say which file (of an ``extends:``
    chain) holds an unknown key."""
    data = _apply_overrides(data or {}, overrides or {})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            if err["type"] == "extra_forbidden":
                problems.append(_unknown_key(loc, overrides or {}, config_file))
            else:
                problems.append(f"{'.'.join(loc) or '<top>'}: {err['msg']}")
        head = f"[stage=config, dataset={source}]"
        if len(problems) == 1:
            raise ConfigError(f"{head} {problems[0]}") from None
        raise ConfigError(f"{head} {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)) from None


def _unknown_key(loc: list[str], overrides: dict[str, Any], config_file: str | os.PathLike | None) -> str:
    """One unknown key, said where it came from (a ``--set`` override or the config file) with the
    nearest valid key at its level, e.g. ``--set judge.bach_size: unknown key; did you mean
    judge.batch_size?``."""
    import difflib

    key = ".".join(loc)
    # an override replaces everything under its key, so the unknown key came from it when one of
    # the two dotted keys contains the other
    given = next((k for k in overrides if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
    close = difflib.get_close_matches(loc[-1], _valid_keys(loc[:-1]), n=1)
    if close:        # the user's key with the bad part replaced
        parts = given.split(".") if given is not None and given.count(".") >= len(loc) else list(loc)
        parts[len(loc) - 1] = close[0]
        hint = f"; did you mean {'.'.join(parts)}?"
    else:
        hint = ""
    if given is not None:
        what = f"--set {given}: unknown key" + ("" if given == key else f" {key!r}")
    elif config_file is not None:
        what = f"{key}: unknown key in {_file_holding(config_file, loc)}"
    else:
        what = f"{key}: unknown key"
    return what + hint


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models a field's type holds (through ``X | None``, lists and dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _valid_keys(parent: list[str]) -> list[str]:
    """The keys a config section (``parent``, dotted parts) accepts."""
    models: list[type[BaseModel]] = [PipelineConfig]
    for part in parent:
        inner = [m for model in models if part in model.model_fields
                 for m in _models_in(model.model_fields[part].annotation)]
        models = inner or models            # a list index or dict key: the same models
    return sorted({name for model in models for name in model.model_fields})


_MISSING = object()


def _file_holding(config_file: str | os.PathLike, loc: list[str]) -> str:
    """The file of ``config_file``'s ``extends:`` chain that sets the dotted key ``loc`` (the
    most derived one), as given when it is ``config_file`` itself."""
    p, seen = Path(config_file).resolve(), set()
    while p not in seen and p.is_file():
        seen.add(p)
        node: Any = _read_yaml(p)
        data = node
        for part in loc:
            node = node.get(part) if isinstance(node, dict) and part in node else _MISSING
        if node is not _MISSING:
            return str(config_file) if p == Path(config_file).resolve() else str(p)
        parent = data.get(EXTENDS)
        if not isinstance(parent, str):
            break
        p = (p.parent / parent).resolve()
    return str(config_file)


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
    return parse_config(read_config_data(path), source=str(path), overrides=overrides, config_file=path)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
