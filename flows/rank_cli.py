"""``qarm rank``: train one ranking model, or compare them all, through the rank-train flow.

A typer sub-app (mounted into ``flows/cli.py`` as ``qarm rank``); importing it starts nothing.
"""

from __future__ import annotations

import os
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.options import ConfigOpt, PoolOpt
from flows.options import parse_sets as _parse_sets
from flows.prefect_api import local_prefect_api
from qarm_core.config import load_config
from qarm_core.rank.config import ALL_MODELS

app = typer.Typer(help="Ranking: GSU/ESU with Semantic IDs against DIN and SIM baselines (rank-train flow).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
err = Console(stderr=True)

SetOpt = typer.Option(None, "--set", help="Override a config key, e.g. --set rank.train.epochs=2 (repeatable).")
EmbOpt = typer.Option(None, "--embeddings", help="Embeddings Parquet (default: the published snapshot's).")
CodesOpt = typer.Option(None, "--codes", help="Codes Parquet (default: the published snapshot's).")


def _show(heads: list[str], rows: list[list[str]], name: str) -> None:
    t = Table(title=name)
    for i, h in enumerate(heads):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    # wide enough for every column even where stdout is not a terminal (rich then assumes 80)
    Console(width=max(Console().width, 170)).print(t)


def _show_history(rows: list[dict], title: str) -> None:
    """The table of ``by_history`` (the comparison's rows or the pooled ones), if any row has one."""
    from qarm_core.rank.compare import history_table

    if any(r.get("by_history") for r in rows):
        _show(*history_table(rows), title)


def print_table(table: list[dict], title: str) -> None:
    from qarm_core.rank.compare import TABLE_HEADERS, format_table

    _show(TABLE_HEADERS, format_table(table), title)
    _show_history(table, "test users with and without events before the test period")


def print_pooled(rows: list[dict], reference: str, why: str, comparisons: int, resample_runs: bool = True) -> None:
    """The table of ``pool_comparisons``' rows (``qarm rank pool``, ``--pool-with``); ``why``: how the
    reference was chosen."""
    from qarm_core.rank.compare import POOL_HEADERS, pool_table

    over = "runs and test users" if resample_runs else "test users (these runs' models)"
    _show(POOL_HEADERS, pool_table(rows), f"{comparisons} comparisons pooled: test AUC over every run, difference to "
                                          f"{reference} ({why}) in one paired bootstrap over {over}")
    _show_history(rows, "pooled: test users with and without events before the test period")


def print_pool_result(pooled: dict) -> None:
    """``rank_pool``'s result: the pooled table, or why nothing was pooled."""
    if pooled["error"]:
        err.print("[bold yellow]not pooled:[/] " + escape(pooled["error"]), highlight=False, soft_wrap=True)
    else:
        print_pooled(pooled["rows"], pooled["reference"], pooled["reference_rule"], pooled["comparisons"])


def _run(config: str, sets: Optional[list[str]], models: list[str] | None, embeddings: str | None,
         codes: str | None, title: str, pool_with: list[str] | None = None) -> None:
    for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                 "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        os.environ.setdefault(k, v)
    from flows.cli import _guard        # lazily: flows.cli imports this module

    done: dict = {}

    def work() -> None:
        overrides = _parse_sets(sets)
        if models:
            overrides["rank.models"] = models
        load_config(config, overrides)          # fail fast on a bad config or pool file, before Prefect starts
        from flows.rank_train import rank_train
        from tasks.rank import read_pool_files

        read_pool_files(pool_with or [])
        with local_prefect_api():
            done["out"] = rank_train(config_path=config, overrides=overrides or None, embeddings_path=embeddings,
                                     codes_path=codes, pool_with=pool_with or None)

    # as every flow command: a QarmError is one error line and exit 2, a stop signal ends the run
    # cleanly with exit 130 (the command's stop handler, not Prefect's SIGTERM bridge)
    _guard(work)
    out = done["out"]
    print_table(out["table"], title)
    if "pooled" in out:
        print_pool_result(out["pooled"])
    Console().print(f"inputs    {out['inputs']}\nmlflow    run {out['mlflow_run_id']}")


@app.command()
def train(model: str = typer.Option(..., "--model", "-m", help=f"One of {', '.join(ALL_MODELS)}."),
          config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt, embeddings: Optional[str] = EmbOpt,
          codes: Optional[str] = CodesOpt) -> None:
    """Train one model on every configured seed and print its AUC / GAUC / logloss."""
    if model not in ALL_MODELS:
        raise typer.BadParameter(f"unknown model {model!r}; choose from {', '.join(ALL_MODELS)}")
    _run(config, set_, [model], embeddings, codes, f"rank-train: {model}")


@app.command()
def compare(config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt, embeddings: Optional[str] = EmbOpt,
            codes: Optional[str] = CodesOpt,
            models: Optional[list[str]] = typer.Option(None, "--model", "-m", help="Models to compare "
                                                       "(repeatable; default: rank.models)."),
            pool_with: Optional[list[str]] = PoolOpt) -> None:
    """Train every model with the same data, budget and seeds; print the comparison table."""
    bad = [m for m in models or [] if m not in ALL_MODELS]
    if bad:
        raise typer.BadParameter(f"unknown model(s) {bad}; choose from {', '.join(ALL_MODELS)}")
    _run(config, set_, models, embeddings, codes,
         "rank-train: lr and epoch chosen on validation; test mean ± std over seeds", pool_with)


@app.command()
def pool(scores: list[str] = typer.Argument(..., help="test_scores.npz of each comparison (the rank/ artifact "
                                             "of a `qarm rank compare` run in MLflow)."),
         reference: Optional[str] = typer.Option(None, "--reference", help="Reference model (default: the "
                                                 "best baseline by validation AUC averaged over the comparisons)."),
         n_boot: int = typer.Option(1000, "--n-boot", min=100, help="Bootstrap replicates."),
         resample_runs: bool = typer.Option(True, "--resample-runs/--fixed-runs",
                                            help="Resample the runs too (the interval carries the variation "
                                                 "between seeds and snapshots), or only the test users.")) -> None:
    """Pool comparisons run on the same ranking samples with other inputs (e.g. snapshots of several
    pipeline seeds) into one paired bootstrap against the reference."""
    from qarm_core.rank.compare import pool_comparisons, pooled_reference, read_comparison_scores

    sets = []
    for path in scores:
        try:
            sets.append(read_comparison_scores(path))
        except ValueError as exc:
            err.print("[bold red]error:[/] " + escape(f"[stage=rank, dataset={path}] {exc}"), highlight=False,
                      soft_wrap=True)
            raise typer.Exit(2) from None
    try:
        ref, why = (reference, "given") if reference else pooled_reference(sets)
        _, rows = pool_comparisons(sets, ref, n_boot=n_boot, resample_runs=resample_runs)
    except ValueError as exc:
        err.print("[bold red]error:[/] " + escape(f"[stage=rank, dataset=test_scores] {exc}"), highlight=False,
                  soft_wrap=True)
        raise typer.Exit(2) from None
    print_pooled(rows, ref, why, len(sets), resample_runs)
