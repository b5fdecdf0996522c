"""The shipped deployment definitions point at the real flow and carry a daily schedule."""

from pathlib import Path

import yaml

from tests.support.paths import REPO


def test_prefect_yaml_entrypoint_loads_the_flow():
    from prefect.flows import load_flow_from_entrypoint

    from qarm_core.config import load_config

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    daily, weekly, rank = spec["deployments"]
    for dep, flow_name in ((daily, "codebook-refresh"), (weekly, "codebook-refresh"), (rank, "rank-train")):
        flow = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
        assert flow.name == flow_name
        assert (REPO / dep["parameters"]["config_path"]).is_file()
    assert daily["schedules"][0]["cron"] == "0 3 * * *" and weekly["schedules"][0]["cron"] == "0 4 * * 0"
    # the daily run reuses the model and warm-starts the codebook; the overrides are valid config keys
    cfg = load_config(REPO / daily["parameters"]["config_path"], daily["parameters"]["overrides"])
    assert cfg.embed.reuse_model and cfg.mine.u2i.reuse_model and cfg.quantize.mode == "warm_start"
    weekly_cfg = load_config(REPO / weekly["parameters"]["config_path"], weekly["parameters"]["overrides"])
    assert not weekly_cfg.embed.reuse_model and weekly_cfg.embed.train.init_from == "published"
    assert not weekly_cfg.mine.u2i.reuse_model             # the weekly retrain trains the two-tower too
    # the weekly retrain trains with the budget the embed-budget curve chose, not the refresh's 40 steps / 360 s
    assert (weekly_cfg.embed.train.max_steps, weekly_cfg.embed.train.max_seconds) == (800, None)


def test_serve_builds_a_cron_deployment():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve", REPO / "deployments" / "serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dep = mod.build(cron="15 2 * * *")
    assert dep.name == "daily-ml100k" and dep.flow_name == "codebook-refresh"
    assert dep.schedules[0].schedule.cron == "15 2 * * *"
    assert Path(dep.parameters["config_path"]).is_file()
    assert dep.parameters["overrides"] == {"embed.reuse_model": True, "mine.u2i.reuse_model": True,
                                          "quantize.mode": "warm_start"}
    retrain = mod.build_retrain()
    assert retrain.name == "weekly-retrain-ml100k"
    # continue the published model, with ML-100K's retrain budget (configs/ml100k.yaml, flow.retrain_overrides)
    assert retrain.parameters["overrides"] == {"embed.train.init_from": "published", "embed.train.max_steps": 800,
                                               "embed.train.max_seconds": None}
