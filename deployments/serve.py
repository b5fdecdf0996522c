"""Serve qarm's deployments from this process (no work pool needed).

    export PREFECT_API_URL=http://127.0.0.1:4200/api   # a running `prefect server start`
    python deployments/serve.py [--cron "0 3 * * *"] [--config configs/ml100k.yaml]

The deployments of ``deployments/definitions.py`` (the same ones ``prefect.yaml`` holds), named after
the config file: ``daily-<name>`` (03:00 UTC) refreshes pairs, judgments and QA, embeds the catalog
with the published model and warm-starts the codebook from the published one, so SIDs stay stable;
``weekly-retrain-<name>`` (Sunday 04:00 UTC) also fine-tunes the embedding model; ``rank-train-<name>``
runs after each successful refresh (a deployment trigger). Runs scheduled by the crons, reruns started
from the Prefect UI and the triggered rank-train runs execute in this process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:   # run as a script: this folder is on sys.path, not the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments import definitions  # noqa: E402
from deployments.definitions import DAILY_CRON, Deployment  # noqa: E402
from flows.options import DEFAULT_CONFIG  # noqa: E402

CRON = DAILY_CRON


def _flow(spec: Deployment):
    if spec.flow_name == definitions.REFRESH_FLOW:
        from flows.codebook_refresh import codebook_refresh
        return codebook_refresh
    from flows.rank_train import rank_train
    return rank_train


def to_runner(spec: Deployment, config: str | Path):
    """The Prefect deployment object of one spec; ``config_path`` absolute, as this process may run anywhere."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    return _flow(spec).to_deployment(
        name=spec.name, schedules=[Cron(spec.cron, timezone=definitions.TIMEZONE)] if spec.cron else None,
        description=spec.description, tags=list(spec.tags),
        parameters={**spec.parameters, "config_path": str(Path(config).resolve())},
        concurrency_limit=ConcurrencyLimitConfig(**spec.concurrency),
        triggers=[DeploymentEventTrigger(**t) for t in spec.triggers] or None)


def build_all(config: str = DEFAULT_CONFIG, cron: str = CRON) -> list:
    """Every deployment of ``config`` (daily refresh, weekly retrain, rank-train)."""
    return [to_runner(spec, config) for spec in definitions.deployments(config, daily_cron=cron)]


def build(config: str = DEFAULT_CONFIG, cron: str = CRON):
    """The daily deployment object."""
    return build_all(config, cron)[0]


def build_retrain(config: str = DEFAULT_CONFIG):
    """The weekly deployment that fine-tunes the embedding model again."""
    return build_all(config)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cron", default=CRON, help="the daily refresh's cron")
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    args = ap.parse_args()
    from prefect import serve
    serve(*build_all(args.config, args.cron))


if __name__ == "__main__":
    main()
