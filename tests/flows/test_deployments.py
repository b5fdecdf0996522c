"""The shipped deployment definitions point at the real flow and carry a daily schedule."""

from pathlib import Path

import yaml

from tests.conftest import REPO


def test_prefect_yaml_entrypoint_loads_the_flow():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    [dep] = spec["deployments"]
    flow = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
    assert flow.name == "codebook-refresh"
    assert dep["schedules"][0]["cron"] == "0 3 * * *"
    assert (REPO / dep["parameters"]["config_path"]).is_file()


def test_serve_builds_a_cron_deployment():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve", REPO / "deployments" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dep = mod.build(cron="15 2 * * *")
    assert dep.name == "daily-ml100k" and dep.flow_name == "codebook-refresh"
    assert dep.schedules[0].schedule.cron == "15 2 * * *"
    assert Path(dep.parameters["config_path"]).is_file()
