"""Serve the daily codebook refresh from this process (no work pool needed).

    export PREFECT_API_URL=http://127.0.0.1:4200/api   # a running `prefect server start`
    python deployments/serve.py [--cron "0 3 * * *"] [--config configs/ml100k.yaml]

Two deployments: ``daily-ml100k`` (03:00 UTC) refreshes pairs, judgments and QA, embeds the catalog
with the published model and warm-starts the codebook from the published one, so SIDs stay stable;
``weekly-retrain-ml100k`` (Sunday 04:00 UTC) also fine-tunes the embedding model. Runs scheduled by
the crons, and reruns started from the Prefect UI, execute in this process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.codebook_refresh import codebook_refresh
from flows.options import DEFAULT_CONFIG

DEPLOYMENT = "daily-ml100k"
CRON = "0 3 * * *"
DAILY_OVERRIDES = {"embed.reuse_model": True, "quantize.mode": "warm_start"}
RETRAIN = "weekly-retrain-ml100k"
RETRAIN_CRON = "0 4 * * 0"
RETRAIN_OVERRIDES = {"embed.train.init_from": "published"}   # continue from the published model


def build(config: str = DEFAULT_CONFIG, cron: str = CRON):
    """The daily deployment object (also what the tests inspect)."""
    return codebook_refresh.to_deployment(name=DEPLOYMENT, cron=cron,
                                          parameters={"config_path": str(Path(config).resolve()),
                                                      "overrides": DAILY_OVERRIDES},
                                          tags=["qarm", "codebook-refresh"])


def build_retrain(config: str = DEFAULT_CONFIG, cron: str = RETRAIN_CRON):
    """The weekly deployment that fine-tunes the embedding model again."""
    return codebook_refresh.to_deployment(name=RETRAIN, cron=cron,
                                          parameters={"config_path": str(Path(config).resolve()),
                                                      "overrides": RETRAIN_OVERRIDES},
                                          tags=["qarm", "codebook-refresh", "retrain"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cron", default=CRON)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    args = ap.parse_args()
    from prefect import serve
    serve(build(args.config, args.cron), build_retrain(args.config))


if __name__ == "__main__":
    main()
