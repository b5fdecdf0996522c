"""deployments/definitions.py is the one definition: prefect.yaml is what it generates, serve.py builds the
same deployments, names follow the config, one run at a time, and rank-train follows each refresh."""

from __future__ import annotations

import importlib.util
import uuid
from datetime import datetime, timezone

import pytest
import yaml

from deployments import definitions
from deployments.definitions import PREFECT_YAML, deployments, prefect_yaml_text
from tests.support.paths import REPO


def _serve_module():
    spec = importlib.util.spec_from_file_location("qarm_serve", REPO / "deployments" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _yaml_deployments(text: str | None = None) -> list[dict]:
    return yaml.safe_load(text or PREFECT_YAML.read_text())["deployments"]


def test_the_committed_prefect_yaml_is_what_the_definition_generates():
    assert PREFECT_YAML.read_text() == prefect_yaml_text(), \
        "run: python deployments/definitions.py --write"
    assert definitions.main(["--check"]) == 0


# the weekly retrain's own overrides (flow.retrain_overrides) on top of continuing the published model:
# ML-100K's training budget from its embed-budget curve; the GPU profile keeps its own step count
RETRAIN = {"embed.train.init_from": "published"}
CPU_BUDGET = {"embed.train.max_steps": 800, "embed.train.max_seconds": None}


@pytest.mark.parametrize("config, name, retrain", [
    ("configs/ml100k.yaml", "ml100k", RETRAIN | CPU_BUDGET), ("configs/tiny.yaml", "tiny", RETRAIN),
    # extends ml100k.yaml (whose `name:` it inherits): its own names; its retrain overrides merged into ml100k's
    ("configs/ml100k-gpu.yaml", "ml100k-gpu", RETRAIN | CPU_BUDGET | {"embed.train.max_steps": 300})])
def test_names_tags_and_parameters_come_from_the_config(config, name, retrain):
    daily, weekly, rank = deployments(config)
    assert (daily.name, weekly.name, rank.name) == (f"daily-{name}", f"weekly-retrain-{name}", f"rank-train-{name}")
    assert (daily.flow_name, weekly.flow_name, rank.flow_name) == ("codebook-refresh", "codebook-refresh", "rank-train")
    assert daily.tags == ["qarm", "codebook-refresh", "daily", f"config:{name}"]
    assert weekly.tags == ["qarm", "codebook-refresh", "retrain", f"config:{name}"]
    assert rank.tags == ["qarm", "rank-train", f"config:{name}"]
    assert all(d.parameters["config_path"] == config for d in (daily, weekly, rank))
    assert daily.parameters["overrides"] == {"embed.reuse_model": True, "mine.u2i.reuse_model": True,
                                             "quantize.mode": "warm_start"}
    assert weekly.parameters["overrides"] == retrain
    assert (daily.cron, weekly.cron, rank.cron) == ("0 3 * * *", "0 4 * * 0", None)
    assert all(d.description for d in (daily, weekly, rank))
    # another config's prefect.yaml names its deployments after it
    other = _yaml_deployments(prefect_yaml_text(config))
    assert [d["name"] for d in other] == [daily.name, weekly.name, rank.name]


def test_a_bad_retrain_override_fails_when_the_deployments_are_built(tmp_path):
    from qarm_core.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(REPO / "configs" / "tiny.yaml") + "\n"
                   "flow:\n  retrain_overrides:\n    embed.train.max_stepz: 600\n")
    with pytest.raises(ConfigError, match="max_stepz"):
        deployments(bad)


def test_every_deployment_runs_one_at_a_time_and_queues_the_next():
    for dep in _yaml_deployments():
        assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    for dep in _serve_module().build_all(str(REPO / "configs" / "ml100k.yaml")):
        assert dep.concurrency_limit == 1
        assert dep.concurrency_options.collision_strategy.value == "ENQUEUE"


def test_prefect_yaml_and_serve_build_the_same_deployments(monkeypatch):
    from prefect.cli.deploy._triggers import DeploymentTriggerAdapter
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)
    from_yaml = _yaml_deployments()
    served = _serve_module().build_all("configs/ml100k.yaml")
    assert [d["name"] for d in from_yaml] == [d.name for d in served] == \
        ["daily-ml100k", "weekly-retrain-ml100k", "rank-train-ml100k"]
    for y, s in zip(from_yaml, served):
        assert load_flow_from_entrypoint(str(REPO / y["entrypoint"])).name == s.flow_name
        assert y["description"] == s.description and y["tags"] == s.tags
        # prefect.yaml's paths are relative to the repository (its pull step's working directory)
        assert {**y["parameters"], "config_path": str(REPO / y["parameters"]["config_path"])} == s.parameters
        assert (REPO / y["parameters"]["config_path"]).is_file()
        assert [(c["cron"], c["timezone"]) for c in y.get("schedules", [])] == \
            [(c.schedule.cron, c.schedule.timezone) for c in s.schedules]
        assert [DeploymentTriggerAdapter.validate_python(t) for t in y.get("triggers", [])] == s.triggers
        assert y["work_pool"] == {"name": "qarm"}   # the process pool, the default


def test_the_docker_pool_is_an_option_of_the_same_file():
    data = yaml.safe_load(PREFECT_YAML.read_text())
    assert data["definitions"]["work_pools"]["docker"]["job_variables"]["image"] == "qarm:cpu"
    docker = _yaml_deployments(prefect_yaml_text(pool="docker"))
    assert {d["work_pool"]["name"] for d in docker} == {"qarm-docker"}
    # each flow run's container joins docker/compose.yaml's stack: its network, its QARM_HOME volume
    # and the addresses its worker has
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    worker = compose["services"]["worker"]
    job = docker[0]["work_pool"]["job_variables"]
    assert all(d["work_pool"]["job_variables"] == job for d in docker)
    assert job["networks"] == [compose["networks"]["default"]["name"]]
    home_volume = next(v for v in worker["volumes"] if v.endswith(":/app/qarm_home"))
    assert job["volumes"] == [f"{compose['volumes'][home_volume.split(':')[0]]['name']}:/app/qarm_home"]
    for key in ("QARM_REPO", "QARM_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        assert job["env"][key] == worker["environment"][key], key
    # the same deployments otherwise
    strip = [{k: v for k, v in d.items() if k != "work_pool"} for d in _yaml_deployments()]
    assert strip == [{k: v for k, v in d.items() if k != "work_pool"} for d in docker]


def _flow_run_event(state: str, flow: str, deployment: str | None):
    from prefect.server.events.schemas.events import ReceivedEvent

    related = [{"prefect.resource.id": f"prefect.flow.{uuid.uuid4()}", "prefect.resource.role": "flow",
                "prefect.resource.name": flow}]
    if deployment:
        related.append({"prefect.resource.id": f"prefect.deployment.{uuid.uuid4()}",
                        "prefect.resource.role": "deployment", "prefect.resource.name": deployment})
    related.append({"prefect.resource.id": "prefect.tag.qarm", "prefect.resource.role": "tag"})
    return ReceivedEvent(occurred=datetime.now(timezone.utc), event=f"prefect.flow-run.{state}",
                         resource={"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}"},
                         related=related, id=uuid.uuid4())


def test_rank_train_is_triggered_by_each_completed_refresh_of_its_config_only():
    from prefect.events import DeploymentEventTrigger
    from prefect.server.events.schemas.automations import AutomationCore

    rank = deployments("configs/ml100k.yaml")[2]
    (spec,) = rank.triggers
    trigger = DeploymentEventTrigger(**spec)
    trigger.set_deployment_id(uuid.uuid4())
    # what the server makes of it (its validator refuses automations that could loop)
    automation = AutomationCore.model_validate(trigger.as_automation().model_dump(mode="json"))
    (action,) = automation.actions
    assert action.type == "run-deployment" and action.source == "selected"
    assert action.parameters == {"config_path": "{{ flow_run.parameters.config_path }}",
                                 "overrides": "{{ flow_run.parameters.overrides }}"}
    server_trigger = automation.trigger
    assert server_trigger.covers(_flow_run_event("Completed", "codebook-refresh", "daily-ml100k"))
    assert server_trigger.covers(_flow_run_event("Completed", "codebook-refresh", "weekly-retrain-ml100k"))
    for not_this in (_flow_run_event("Failed", "codebook-refresh", "daily-ml100k"),
                     _flow_run_event("Crashed", "codebook-refresh", "daily-ml100k"),
                     _flow_run_event("Completed", "codebook-refresh", "daily-tiny"),     # another config
                     _flow_run_event("Completed", "codebook-refresh", None),             # `qarm refresh`
                     _flow_run_event("Completed", "rank-train", "rank-train-ml100k")):   # no loop
        assert not server_trigger.covers(not_this)
