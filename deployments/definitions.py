"""The one definition of qarm's Prefect deployments; ``prefect.yaml`` and ``serve.py`` are built from it.

For a config file ``configs/<name>.yaml`` (the name is the file's stem, so a config that ``extends:``
another still gets its own deployments):

* ``codebook-refresh/daily-<name>``: 03:00 UTC, the published models reused (the embedding LLM and the
  u2i miner's two towers) and the codebook warm-started from the published one (stable SIDs);
* ``codebook-refresh/weekly-retrain-<name>``: Sunday 04:00 UTC, the embedding model fine-tuned again
  from the published one (the two towers trained again), with the config's ``flow.retrain_overrides`` (e.g. its training budget);
* ``rank-train/rank-train-<name>``: no schedule; an automation (a deployment trigger) runs it after each
  Completed run of the two refresh deployments, with that run's ``config_path`` and ``overrides``.

Each has a concurrency limit of 1 with collision strategy ENQUEUE: a run started while another run of the
same deployment is going (a manual rerun during the scheduled one) waits for it. A daily and a weekly
run of the same home are kept apart by the refresh's lease (``flow.on_busy``).

    python deployments/definitions.py --write          # rewrite deployments/prefect.yaml
    python deployments/definitions.py --check          # exit 1 if prefect.yaml is not what this generates
    python deployments/definitions.py --config configs/tiny.yaml --pool docker   # print another one

Imports neither the flows nor Prefect (only the config, to read and check the retrain's overrides):
``serve.py`` turns these specs into Prefect objects.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
PREFECT_VERSION = "3.8.8"
# Relative to the repository: prefect.yaml's pull step makes the repository the working directory.
DEFAULT_CONFIG = "configs/ml100k.yaml"

REFRESH_FLOW, REFRESH_ENTRYPOINT = "codebook-refresh", "flows/codebook_refresh.py:codebook_refresh"
RANK_FLOW, RANK_ENTRYPOINT = "rank-train", "flows/rank_train.py:rank_train"

DAILY_CRON = "0 3 * * *"
WEEKLY_CRON = "0 4 * * 0"
TIMEZONE = "UTC"
DAILY_OVERRIDES = {"embed.reuse_model": True, "mine.u2i.reuse_model": True, "quantize.mode": "warm_start"}
RETRAIN_OVERRIDES = {"embed.train.init_from": "published"}   # continue from the published model
# prefect.yaml's `concurrency_limit:` block; serve.py builds a ConcurrencyLimitConfig from it.
CONCURRENCY = {"limit": 1, "collision_strategy": "ENQUEUE"}
COMPLETED = "prefect.flow-run.Completed"

# The work pools prefect.yaml can target. `process` (the default): `prefect work-pool create qarm
# --type process` and a worker on a machine with this checkout. `docker`: the image built from
# docker/Dockerfile (repository at /app in it); needs the prefect-docker package on the worker.
WORK_POOLS: dict[str, dict[str, Any]] = {
    "process": {"name": "qarm"},
    # A docker-type pool (a Prefect docker worker, prefect-docker installed beside it): each flow run
    # in its own qarm:cpu container on docker/compose.yaml's network and QARM_HOME volume, with the
    # addresses the compose worker has (x-worker-env there), so its runs reach the same stack.
    "docker": {"name": "qarm-docker", "job_variables": {
        "image": "qarm:cpu", "image_pull_policy": "Never", "networks": ["qarm"],
        "volumes": ["qarm-home:/app/qarm_home"],
        "env": {"QARM_REPO": "/app", "QARM_HOME": "/app/qarm_home", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
                "PREFECT_API_URL": "http://prefect-server:4200/api"}}},
}


@dataclass(frozen=True)
class Deployment:
    """One deployment: what both prefect.yaml and serve.py say about it."""

    name: str
    flow_name: str
    entrypoint: str
    description: str
    parameters: dict[str, Any]
    tags: list[str]
    cron: str | None = None
    concurrency: dict[str, Any] = field(default_factory=lambda: dict(CONCURRENCY))
    # Deployment triggers as prefect.yaml writes them (prefect.events.DeploymentEventTrigger fields).
    triggers: list[dict[str, Any]] = field(default_factory=list)


def retrain_overrides(config_path: str | Path) -> dict[str, Any]:
    """The weekly retrain's overrides: continue from the published model (``RETRAIN_OVERRIDES``),
    plus the config's own ``flow.retrain_overrides`` (ML-100K: the training budget its embed-budget
    curve chose). Checked by loading the config with them: a bad key fails when the deployments are
    built, not on Sunday."""
    from qarm_core.config import load_config

    path = Path(config_path)
    path = path if path.is_absolute() else REPO / path
    overrides = {**RETRAIN_OVERRIDES, **load_config(path).flow.retrain_overrides}
    load_config(path, overrides)
    return overrides


def config_name(config_path: str | Path) -> str:
    """``configs/ml100k.yaml`` -> ``ml100k``."""
    return Path(config_path).stem


def refresh_trigger(name: str, refresh_deployments: list[str]) -> dict[str, Any]:
    """Run the deployment it is attached to after each Completed run of ``refresh_deployments``,
    with that run's config and overrides (templates rendered by the server when it fires)."""
    return {
        "type": "event",
        "name": f"rank-train-{name} after a refresh",
        "description": f"Runs rank-train-{name} after each successful run of "
                       f"{' or '.join(refresh_deployments)}, on the config and overrides of that run.",
        "enabled": True,
        "expect": [COMPLETED],
        "match": {"prefect.resource.id": "prefect.flow-run.*"},
        "match_related": [
            {"prefect.resource.role": "flow", "prefect.resource.name": REFRESH_FLOW},
            {"prefect.resource.role": "deployment", "prefect.resource.name": list(refresh_deployments)},
        ],
        "posture": "Reactive",
        "threshold": 1,
        "within": 0,
        "parameters": {"config_path": "{{ flow_run.parameters.config_path }}",
                       "overrides": "{{ flow_run.parameters.overrides }}"},
    }


def deployments(config_path: str | Path = DEFAULT_CONFIG, daily_cron: str = DAILY_CRON,
                weekly_cron: str = WEEKLY_CRON) -> list[Deployment]:
    """The deployments of one config: daily refresh, weekly retrain, rank-train after each refresh."""
    name, config_path = config_name(config_path), str(config_path)
    daily, weekly, rank = f"daily-{name}", f"weekly-retrain-{name}", f"rank-train-{name}"
    tag = f"config:{name}"
    return [
        Deployment(
            name=daily, flow_name=REFRESH_FLOW, entrypoint=REFRESH_ENTRYPOINT, cron=daily_cron,
            description=(f"Daily codebook refresh on {config_path}: new pairs judged, QA deferred to the weekly run, the "
                         "catalog embedded with the published model, the codebook warm-started from the "
                         "published one (stable SIDs). One run at a time; a rerun waits for the running one."),
            parameters={"config_path": config_path, "overrides": dict(DAILY_OVERRIDES)},
            tags=["qarm", REFRESH_FLOW, "daily", tag]),
        Deployment(
            name=weekly, flow_name=REFRESH_FLOW, entrypoint=REFRESH_ENTRYPOINT, cron=weekly_cron,
            description=(f"Weekly refresh on {config_path} that also fine-tunes the embedding model on the "
                         "latest judged pairs and QA (answering the items the daily runs deferred), continuing from the "
                         "published model; the embed gate "
                         "publishes it only if it beats the published one on validation, and the codebook "
                         "is refitted for the new model with its cells renumbered onto the old SIDs."),
            parameters={"config_path": config_path, "overrides": retrain_overrides(config_path)},
            tags=["qarm", REFRESH_FLOW, "retrain", tag]),
        Deployment(
            name=rank, flow_name=RANK_FLOW, entrypoint=RANK_ENTRYPOINT, cron=None,
            description=(f"Ranking models trained and compared on the snapshot just published: started by an "
                         f"automation after each Completed run of {daily} or {weekly}, with that run's "
                         "config_path and overrides."),
            parameters={"config_path": config_path, "overrides": {}},
            tags=["qarm", RANK_FLOW, tag],
            triggers=[refresh_trigger(name, [daily, weekly])]),
    ]


HEADER = """\
# GENERATED by `python deployments/definitions.py --write` from deployments/definitions.py (the one
# definition serve.py also builds from); tests/unit/test_deployments.py fails when they differ.
#
# From the repo root, with a Prefect server running (make prefect-ui; export PREFECT_API_URL=http://127.0.0.1:4200/api):
#   prefect work-pool create qarm --type process
#   QARM_REPO=$PWD prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml
#   prefect worker start --pool qarm
# Or, without a work pool: python deployments/serve.py
#
# Work pool: every deployment uses the `&work_pool` entry of `definitions.work_pools`. For containers
# from docker/Dockerfile instead (docker build -f docker/Dockerfile -t qarm:cpu .; pip install prefect-docker;
# prefect work-pool create qarm-docker --type docker; prefect worker start --pool qarm-docker):
#   python deployments/definitions.py --pool docker > /tmp/prefect.yaml   # the anchor on `docker`
#   QARM_REPO=/app prefect --no-prompt deploy --all --prefect-file /tmp/prefect.yaml
# (QARM_REPO is resolved when deploying: the repository's path where the flow runs.)
"""


class _Dumper(yaml.SafeDumper):
    """Block style, long strings folded, and the shared work-pool mapping anchored as ``work_pool``."""

    anchor_names: dict[int, str] = {}

    def generate_anchor(self, node):   # noqa: D102 - only the work pool is shared
        return "work_pool"

    def ignore_aliases(self, data):
        return not isinstance(data, dict) or id(data) not in self.anchor_names


def _str(dumper: yaml.SafeDumper, s: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=">" if len(s) > 80 else None)


_Dumper.add_representer(str, _str)


def prefect_yaml_data(config_path: str | Path = DEFAULT_CONFIG, pool: str = "process",
                      daily_cron: str = DAILY_CRON) -> tuple[dict[str, Any], dict[str, Any]]:
    """prefect.yaml as data, and the work-pool mapping every deployment shares."""
    pools = copy.deepcopy(WORK_POOLS)
    shared = pools[pool]
    deps = []
    for d in deployments(config_path, daily_cron):
        dep: dict[str, Any] = {"name": d.name, "description": d.description, "entrypoint": d.entrypoint,
                               "tags": list(d.tags), "parameters": copy.deepcopy(d.parameters)}
        if d.cron:
            dep["schedules"] = [{"cron": d.cron, "timezone": TIMEZONE}]
        dep["concurrency_limit"] = dict(d.concurrency)
        if d.triggers:
            dep["triggers"] = copy.deepcopy(d.triggers)
        dep["work_pool"] = shared
        deps.append(dep)
    data = {"name": "qarm", "prefect-version": PREFECT_VERSION,
            "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $QARM_REPO }}"}}],
            "definitions": {"work_pools": pools},
            "deployments": deps}
    return data, shared


def prefect_yaml_text(config_path: str | Path = DEFAULT_CONFIG, pool: str = "process",
                      daily_cron: str = DAILY_CRON) -> str:
    data, shared = prefect_yaml_data(config_path, pool, daily_cron)

    class Dumper(_Dumper):
        anchor_names = {id(shared): "work_pool"}

    return HEADER + "\n" + yaml.dump(data, Dumper=Dumper, sort_keys=False, width=110, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="config path, relative to the repository")
    ap.add_argument("--pool", choices=sorted(WORK_POOLS), default="process")
    ap.add_argument("--daily-cron", default=DAILY_CRON)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", nargs="?", const=str(PREFECT_YAML), metavar="PATH",
                      help=f"write the file (default {PREFECT_YAML.relative_to(REPO)})")
    mode.add_argument("--check", nargs="?", const=str(PREFECT_YAML), metavar="PATH",
                      help="exit 1 if the file differs from what would be generated")
    args = ap.parse_args(argv)
    text = prefect_yaml_text(args.config, args.pool, args.daily_cron)
    if args.write:
        Path(args.write).write_text(text)
    elif args.check:
        if Path(args.check).read_text() != text:
            print(f"{args.check} is not what deployments/definitions.py generates; run "
                  "python deployments/definitions.py --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
