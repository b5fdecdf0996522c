"""Serve the daily codebook refresh from this process (no work pool needed).

    export PREFECT_API_URL=http://127.0.0.1:4200/api   # a running `prefect server start`
    python deployments/serve.py [--cron "0 3 * * *"] [--config configs/ml100k.yaml]

Runs scheduled by the cron, and reruns started from the Prefect UI, execute in this process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.codebook_refresh import DEFAULT_CONFIG, codebook_refresh

DEPLOYMENT = "daily-ml100k"
CRON = "0 3 * * *"


def build(config: str = DEFAULT_CONFIG, cron: str = CRON):
    """The deployment object (also what the tests inspect)."""
    return codebook_refresh.to_deployment(name=DEPLOYMENT, cron=cron,
                                          parameters={"config_path": str(Path(config).resolve())},
                                          tags=["qarm", "codebook-refresh"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cron", default=CRON)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    args = ap.parse_args()
    from prefect import serve
    serve(build(args.config, args.cron))


if __name__ == "__main__":
    main()
