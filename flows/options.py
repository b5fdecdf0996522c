"""The default config and option parsing shared by the flows and the CLI apps."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
import yaml

# The config a flow or command runs when none is named: ML-100K, what `make run` runs.
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "ml100k.yaml")
ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Pipeline config YAML.")
SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set ingest.synth.users=100 (repeatable).")
PoolOpt = typer.Option(None, "--pool-with", help="An earlier comparison's rank/test_scores.npz on the same samples "
                       "(e.g. another pipeline seed's snapshot), pooled with this one in one bootstrap over runs and "
                       "test users (repeatable; read before any training).")


def parse_sets(sets: Optional[list[str]]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as dotted config overrides; values are parsed as YAML
    (``--set storage.retention=10`` gives the integer 10)."""
    out: dict[str, Any] = {}
    for s in sets or []:
        if "=" not in s:
            raise typer.BadParameter(f"--set wants KEY=VALUE, got {s!r}")
        k, v = s.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out
