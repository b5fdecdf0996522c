
import pytest

from qarm_core.config import PipelineConfig, dump_config, load_config, parse_config
from qarm_core.errors import ConfigError
from tests.support.paths import REPO


@pytest.mark.parametrize("name", ["ml100k.yaml", "ml100k-gpu.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, PipelineConfig)
    # round-trip: the dumped resolved config parses back to the same thing
    resolved = cfg.resolved()
    assert parse_config(__import__("yaml").safe_load(dump_config(resolved))) == resolved


def test_unknown_key_fails_and_names_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ingest:\n  sorce: synth\n")
    with pytest.raises(ConfigError, match=r"ingest\.sorce: unknown key"):
        load_config(p)


def test_wrong_type_fails(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("duckdb:\n  threads: 'two'\n")
    with pytest.raises(ConfigError, match=r"duckdb\.threads"):
        load_config(p)


def test_numeric_string_is_not_coerced():
    with pytest.raises(ConfigError, match="storage.retention"):
        parse_config({"storage": {"retention": "3"}})


def test_bad_values_fail():
    with pytest.raises(ConfigError, match="ingest.source"):
        parse_config({"ingest": {"source": "kafka"}})
    with pytest.raises(ConfigError, match="min_rows"):
        parse_config({"gates": {"items": {"min_rows": 10, "max_rows": 5}}})
    with pytest.raises(ConfigError, match="ingest.files.interactions"):
        parse_config({"ingest": {"source": "files"}})


def test_not_a_mapping_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_overrides_and_env(monkeypatch, tmp_path):
    cfg = parse_config({}, overrides={"ingest.source": "synth", "ingest.synth.users": 5})
    assert cfg.ingest.source == "synth" and cfg.ingest.synth.users == 5
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({}, overrides={"ingest.synth.userz": 5})
    monkeypatch.setenv("QARM_HOME", str(tmp_path / "h"))
    r = PipelineConfig().resolved()
    assert r.home == str(tmp_path / "h")
    assert r.tracking.tracking_uri == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    assert r.ingest.ml100k.cache_dir == str(tmp_path / "h" / "cache" / "recbole")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert PipelineConfig().resolved().tracking.tracking_uri == "http://127.0.0.1:5000"


def test_fingerprint_tracks_content():
    a = parse_config({"ingest": {"synth": {"seed": 1}}})
    b = parse_config({"ingest": {"synth": {"seed": 2}}})
    assert a.fingerprint() == parse_config({"ingest": {"synth": {"seed": 1}}}).fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_frozen():
    with pytest.raises(Exception):
        PipelineConfig().home = "x"  # type: ignore[misc]


def test_duplicate_keys_are_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("gates:\n  items:\n    min_rows: 10\nname: x\ngates:\n  codes:\n    max_raw_collision_rate: 0.5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: duplicate key 'gates' at line 5"):
        load_config(p)


def test_extends_merges_sections_and_replaces_lists(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nmine:\n  sources: [swing, u2i]\n  swing:\n    top_k: 5\n"
                                        "    beta: 0.5\nstorage:\n  retention: 3\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\nmine:\n  sources: [swing]\n"
                                         "  swing:\n    top_k: 20\n")
    cfg = load_config(tmp_path / "child.yaml", {"storage.retention": 4})
    assert cfg.name == "child"
    assert cfg.mine.sources == ["swing"]                               # a list replaces
    assert (cfg.mine.swing.top_k, cfg.mine.swing.beta) == (20, 0.5)    # a mapping merges
    assert cfg.storage.retention == 4                                  # --set still wins


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends forms a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="extends must be a file name"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("extends: base.yaml\nmine:\n  swing:\n    top_kk: 3\n")
    (tmp_path / "base.yaml").write_text("name: base\n")
    with pytest.raises(ConfigError, match=r"mine\.swing\.top_kk: unknown key"):
        load_config(tmp_path / "e.yaml")


def test_gpu_profile_differs_from_ml100k_only_where_it_says():
    gpu, cpu = load_config(REPO / "configs" / "ml100k-gpu.yaml"), load_config(REPO / "configs" / "ml100k.yaml")
    assert gpu.embed.train.launcher == "deepspeed" and gpu.embed.train.nproc == 8
    assert gpu.embed.infer.device == "cuda" and cpu.embed.infer.device == "auto"
    # the CPU profile freezes the lowest 20 of SmolLM2's 30 blocks; the GPU profile trains them all
    assert cpu.embed.train.freeze_layers == 20 and gpu.embed.train.freeze_layers == 0
    assert gpu.quantize == cpu.quantize and gpu.gates == cpu.gates and gpu.ingest == cpu.ingest


def test_the_gpu_profiles_one_gpu_settings_validate():
    """The profile's comment and the README give one GPU as launcher none + nproc 1: the whole 512-pair
    batch in one process, with no gradient cache (measured on an H200); nproc 1 with the profile's
    launcher is refused, as the comment says."""
    one = load_config(REPO / "configs" / "ml100k-gpu.yaml",
                      {"embed.train.launcher": "none", "embed.train.nproc": 1})
    assert one.embed.train.world_size == 1 and one.embed.train.batch_size == 512
    assert one.embed.train.grad_cache_chunk == 0
    with pytest.raises(ConfigError, match="needs nnodes \\* nproc >= 2"):
        load_config(REPO / "configs" / "ml100k-gpu.yaml", {"embed.train.nproc": 1})


def test_the_positive_event_rule_is_configured_once():
    """One threshold decides what a positive event is for mining, the judge's calibration, the
    embedding gate, the evaluation and the ranking labels: no stage config carries its own."""
    from pydantic import BaseModel

    def fields(model: type[BaseModel], prefix: str = ""):
        for name, f in model.model_fields.items():
            yield prefix + name
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                yield from fields(f.annotation, f"{prefix}{name}.")

    assert [f for f in fields(PipelineConfig) if f.endswith("min_rating")] == ["events.positive_min_rating"]
    cfg = parse_config({"events": {"positive_min_rating": 3.0}})
    assert cfg.events.positive_min_rating == 3.0
    with pytest.raises(ConfigError, match="positive_min_rating"):
        parse_config({"events": {"positive_min_rating": float("nan")}})
    with pytest.raises(ConfigError, match="min_rating"):
        parse_config({"mine": {"min_rating": 4.0}})      # the old per-stage key is refused, not ignored


# ---------------------------------------------------------------- unknown keys: where from, nearest valid key
def test_unknown_key_in_the_file_names_the_file_and_the_nearest_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ingest:\n  synth:\n    userz: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value) == (f"[stage=config, dataset={p}] ingest.synth.userz: unknown key in {p}; "
                              "did you mean ingest.synth.users?")
    assert "--set" not in str(err.value)


def test_unknown_key_from_set_says_so(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: c\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, {"mine.swing.top_kk": 3})
    assert str(err.value) == (f"[stage=config, dataset={p}] --set mine.swing.top_kk: unknown key; "
                              "did you mean mine.swing.top_k?")
    assert f"in {p}" not in str(err.value)


def test_unknown_key_nested_and_in_a_section_name(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: c\n")
    # the bad part is the section: the suggestion keeps the rest of what was typed
    with pytest.raises(ConfigError, match=r"--set ingst\.synth\.users: unknown key 'ingst'; "
                                          r"did you mean ingest\.synth\.users\?$"):
        load_config(p, {"ingst.synth.users": 3})
    # a whole section given with --set: the key inside it is named
    with pytest.raises(ConfigError, match=r"--set storage: unknown key 'storage\.retenton'; "
                                          r"did you mean storage\.retention\?$"):
        load_config(p, {"storage": {"retenton": 3}})
    # deep in the file, and in the file an extends: chain took it from
    (tmp_path / "base.yaml").write_text("embed:\n  model:\n    dimm: 8\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\n")
    with pytest.raises(ConfigError, match=r"embed\.model\.dimm: unknown key in .*base\.yaml; "
                                          r"did you mean embed\.model\.dim\?$"):
        load_config(tmp_path / "child.yaml")


def test_unknown_key_with_no_close_match_gets_no_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("judge:\n  qwertyuiop: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, {"zzzzzz": 1})
    text = str(err.value)
    assert text.startswith(f"[stage=config, dataset={p}] 2 problems:")
    assert f"  - judge.qwertyuiop: unknown key in {p}\n" in text + "\n"
    assert "  - --set zzzzzz: unknown key" in text and "did you mean" not in text


# ---------------------------------------------------------------- tracking URIs never carry a password out
SECRET_URI = "http://alice:s3cr3t@mlflow.example:5000/base"


def test_a_tracking_uri_with_credentials_in_the_config_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(f"tracking:\n  tracking_uri: {SECRET_URI}\n")
    for load in (lambda: load_config(p), lambda: load_config(REPO / "configs" / "tiny.yaml",
                                                                {"tracking.tracking_uri": SECRET_URI})):
        with pytest.raises(ConfigError) as exc:
            load()
        msg = str(exc.value)
        assert "tracking.tracking_uri" in msg and "carries credentials" in msg, msg
        assert "MLFLOW_TRACKING_USERNAME" in msg and "MLFLOW_TRACKING_PASSWORD" in msg
        assert "s3cr3t" not in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"tracking\.ui_url: .*carries credentials") as exc:
        parse_config({"tracking": {"ui_url": "https://bob:hunter2@ui.example"}})
    assert "hunter2" not in str(exc.value)
    # the same URIs without credentials are fine, a query or token-free path included
    ok = parse_config({"tracking": {"tracking_uri": "http://mlflow.example:5000/base", "ui_url": "https://ui.example"}})
    assert ok.tracking.tracking_uri == "http://mlflow.example:5000/base"


def test_a_tracking_uri_with_credentials_from_the_environment_is_used_but_never_written(monkeypatch, tmp_path):
    """MLFLOW_TRACKING_URI wins over the config and keeps its credentials for MLflow; what is logged
    to MLflow as params (``to_dict``), written as resolved.yaml (``dump_config``), into the snapshot
    manifest and printed by ``qarm config`` is the URI without them."""
    import json

    monkeypatch.setenv("QARM_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URI + "?token=t0k3n")
    cfg = load_config(REPO / "configs" / "tiny.yaml").resolved()
    assert cfg.tracking.tracking_uri == SECRET_URI + "?token=t0k3n"            # what MLflow connects with
    assert cfg.to_dict()["tracking"]["tracking_uri"] == "http://mlflow.example:5000/base"
    for text in (json.dumps(cfg.to_dict()), dump_config(cfg)):
        assert "s3cr3t" not in text and "alice" not in text and "t0k3n" not in text
    assert "tracking_uri: http://mlflow.example:5000/base\n" in dump_config(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URI.replace("s3cr3t", "other"))
    assert load_config(REPO / "configs" / "tiny.yaml").resolved().fingerprint() == cfg.fingerprint()


@pytest.mark.parametrize("uri", ["sqlite:////abs/qarm_home/mlflow.db", "sqlite:///rel/mlflow.db", "file:///tmp/mlruns",
                                 "./mlruns", "databricks", "databricks://Profile", "http://[::1]:5000",
                                 "https://MLflow.Example:8443/a/b", "postgresql://db.example:5432/mlflow"])
def test_redact_uri_leaves_a_uri_without_credentials_as_given(uri):
    from qarm_core.config import redact_uri

    assert redact_uri(uri) == uri
    assert parse_config({"tracking": {"tracking_uri": uri}}).to_dict()["tracking"]["tracking_uri"] == uri


@pytest.mark.parametrize("uri, shown", [
    ("http://alice:s3cr3t@host:5000", "http://host:5000"),
    ("https://alice:s3cr3t@[::1]:5000/x/y?token=z#f", "https://[::1]:5000/x/y"),
    ("postgresql://alice:p@ss@db.example/mlflow", "postgresql://db.example/mlflow"),     # '@' in the password
    ("http://token@host", "http://host"),
])
def test_redact_uri_removes_user_info_query_and_fragment(uri, shown):
    from qarm_core.config import redact_uri, scrub_credentials

    assert redact_uri(uri) == shown
    said = f"API request to {uri.split('?')[0]}/api/2.0/mlflow/runs/get failed"
    assert "alice" not in scrub_credentials(said, uri) and "token@" not in scrub_credentials(said, uri)
    assert scrub_credentials(said, "sqlite:///x.db") == said
