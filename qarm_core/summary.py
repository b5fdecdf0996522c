"""A refresh's one-page summary (markdown): what was published, its headline metrics, the gates'
verdicts, what each stage decided, and where the full record is. Pure formatting; the flow's
summary task gathers the values and publishes the page as a Prefect artifact and on the MLflow run."""

from __future__ import annotations

from typing import Mapping


def format_metric(v: float | None) -> str:
    """A metric as the summary and ``qarm runs compare`` print it: counts with separators, other
    values to 4 decimals, ``n/a`` for NaN, ``-`` for absent."""
    if v is None:
        return "-"
    if v != v:                                   # NaN
        return "n/a"
    if float(v).is_integer() and abs(v) >= 1:
        return f"{int(v):,}"
    return f"{v:.4f}"


def refresh_summary_markdown(snapshot_id: str, rows: Mapping[str, int], headline: Mapping[str, float],
                             gates: Mapping[str, bool], notes: Mapping[str, str], mlflow_link: str,
                             title: str = "codebook refresh") -> str:
    """Markdown: a header with the snapshot and the MLflow link, then tables of headline metrics
    (``<stage>.<metric>`` -> value), gate verdicts (``<stage>/<dataset>`` -> passed), the stages'
    decisions (``notes``) and row counts per dataset."""
    failed = [g for g, ok in gates.items() if not ok]
    lines = [f"# {title}: snapshot `{snapshot_id}`", "",
             f"MLflow run: {mlflow_link}", "",
             f"Gates: {len(gates) - len(failed)} of {len(gates)} passed" + (f" (failed: {', '.join(failed)})" if failed else ""),
             "", "## Headline metrics", "", "| metric | value |", "|---|--:|"]
    lines += [f"| {k} | {format_metric(v)} |" for k, v in sorted(headline.items())] or ["| (none logged) | |"]
    lines += ["", "## Gates", "", "| gate | verdict |", "|---|---|"]
    lines += [f"| {g} | {'passed' if ok else '**failed**'} |" for g, ok in sorted(gates.items())]
    if notes:
        lines += ["", "## What the stages decided", "", "| stage | decision |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in sorted(notes.items())]
    lines += ["", "## Rows", "", "| dataset | rows |", "|---|--:|"]
    lines += [f"| {n} | {r:,} |" for n, r in sorted(rows.items())]
    return "\n".join(lines) + "\n"
