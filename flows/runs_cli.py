"""``qarm runs``: the MLflow record of past refreshes in the terminal."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.options import ConfigOpt, SetOpt
from flows.options import parse_sets as _parse_sets
from qarm_core.config import load_config, redact_uri, scrub_credentials
from qarm_core.summary import format_metric

app = typer.Typer(help="Past runs, from MLflow.", no_args_is_help=True)


@app.callback()
def runs() -> None:
    """Past runs, from MLflow."""


@app.command("compare")
def compare(run_ids: Optional[list[str]] = typer.Argument(None, help="MLflow run ids (default: the last --last refreshes)."),
            last: int = typer.Option(5, min=1, help="How many of the newest refreshes, without run ids."),
            config: str = ConfigOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """The headline metrics of refreshes side by side: judge AUC and rejection rates, collision,
    decode HR@k, EdgeNum, churn, embedding recall@10, ranking AUC/GAUC (where rank-train ran)."""
    from flows.cli import _guard        # lazily: flows.cli imports this module

    def show() -> None:
        from tasks import tracking

        import mlflow

        cfg = load_config(config, _parse_sets(set_)).resolved()
        console = Console()
        try:
            runs = tracking.headline_runs(cfg, run_ids or None, last)
        except mlflow.exceptions.MlflowException as exc:
            console.print(f"[bold red]error:[/] {scrub_credentials(exc.message, cfg.tracking.tracking_uri)}",
                          highlight=False)
            raise typer.Exit(2) from None
        if not runs:
            console.print(f"no codebook-refresh runs in experiment {cfg.tracking.experiment!r} "
                          f"at {redact_uri(cfg.tracking.tracking_uri)}")
            raise typer.Exit(1)
        table = Table(title=f"{len(runs)} refresh run(s), newest first" if not run_ids else "refresh runs")
        table.add_column("metric", no_wrap=True)
        for r in runs:
            table.add_column(f"{r['run_id'][:8]}\n{r['start']}\n{r['status'].lower()}", justify="right")
        for key in sorted({k for r in runs for k in r["headline"]}):
            table.add_row(key, *[format_metric(r["headline"].get(key)) for r in runs])
        table.add_row("commit", *[r["commit"] or "-" for r in runs])
        console.print(table)
        for r in runs:
            console.print(f"{r['run_id']}  {r['name']}", highlight=False)

    _guard(show)
