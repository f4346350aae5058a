"""`difftpt-ops table`: methods x datasets with the papers' averages, paired tests and published numbers."""

from __future__ import annotations

import csv
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import EceBinsOpt, JsonOpt, engine_of, plain, print_json, settings_of, table_console
from difftpt_ops.core.errors import InputError
from difftpt_ops.services.reading.stats import ECE_BINS

if TYPE_CHECKING:
    from difftpt_ops.services.reading.table_model import Table


def _names(option: str, value: str | None) -> tuple[str, ...]:
    """A comma-separated list; empty items are bad input."""
    if value is None:
        return ()
    items = tuple(item.strip() for item in value.split(","))
    if not all(items):
        raise InputError(option, value, "expected a comma-separated list without empty items")
    return items


def _run_ids(value: str | None) -> tuple[int, ...]:
    try:
        ids = tuple(int(item) for item in _names("--runs", value))
    except ValueError:
        raise InputError("--runs", value, "expected comma-separated run ids, e.g. --runs 3,4,7") from None
    if any(i < 1 for i in ids):
        raise InputError("--runs", value, "run ids start at 1")
    return ids


def _print_rich(table: Table) -> None:
    from rich.table import Table

    from difftpt_ops.services.reading.table_render import display_header, row_texts

    title = f"{table.metric} (%) of model {table.model or '-'}" + (
        f", paired against {table.baseline_row}" if table.baseline_row else "")
    rich_table = Table(title=plain(title))
    for i, column in enumerate(display_header(table)):
        rich_table.add_column(column, justify="left" if i == 0 else "right")
    for row, texts in zip(table.rows, row_texts(table), strict=True):
        rich_table.add_row(*map(plain, texts), style=None if row.kind == "ours" else "italic dim")
    table_console().print(rich_table)
    for note in table.notes[1:]:  # the first note (metric and model) is the title
        typer.echo(note)


def table(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(
        "--model", help="Model name as submitted (default: the model of the newest finished run).")] = None,
    methods: Annotated[str | None, typer.Option("--methods", help="Comma-separated methods (default: all).")] = None,
    datasets: Annotated[str | None, typer.Option(
        "--datasets", help="Comma-separated dataset names (default: all with runs).")] = None,
    metric: Annotated[str, typer.Option("--metric", help="top1, top5 or ece.")] = "top1",
    baseline: Annotated[str | None, typer.Option(
        "--baseline", help="Method every cell is tested against, its row at the defaults when it has one "
                           "(default: zeroshot when present).")] = None,
    runs: Annotated[str | None, typer.Option(
        "--runs", help="Comma-separated run ids to tabulate instead of the latest runs.")] = None,
    sweep: Annotated[int | None, typer.Option(
        "--sweep", help="Tabulate one sweep: a row per grid point (seeds averaged).")] = None,
    published: Annotated[bool, typer.Option(
        "--published", help="Add published numbers as rows, and ours minus published.")] = False,
    published_backbone: Annotated[str | None, typer.Option(
        "--published-backbone", help="ViT-B/16 or RN50 (default: from the model name; ViT-B/16 otherwise).")]
    = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Significance level after Holm's correction.")] = 0.05,
    ece_bins: EceBinsOpt = None,
    format: Annotated[str, typer.Option("--format", help="rich, markdown, latex, csv or json.")] = "rich",
    log: Annotated[bool, typer.Option(
        "--log", help="Also log the table (Markdown, CSV, JSON, heatmap PNG) to one MLflow run named after it.")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Methods as rows (a row per configuration: `zeroshot prompts=ensemble`), datasets as columns: the latest
    finished runs of one model, the papers' averages (ImageNet + 4 shifts, the 4 shifts, the 10 cross-domain
    sets) and Holm-corrected McNemar tests."""
    from difftpt_ops.services.reading.table import build_table
    from difftpt_ops.services.reading.table_model import FORMATS, TableQuery
    from difftpt_ops.services.reading.table_render import log_table

    if as_json:
        format = "json"
    if format not in FORMATS:
        raise InputError("--format", format, f"must be one of {', '.join(FORMATS)}")
    if ece_bins is not None and metric != "ece":
        raise InputError("--ece-bins", ece_bins, "only applies with --metric ece")
    query = TableQuery(model=model, methods=_names("--methods", methods), datasets=_names("--datasets", datasets),
                       metric=metric, baseline=baseline, run_ids=_run_ids(runs), sweep_id=sweep, alpha=alpha,
                       published=published, published_backbone=published_backbone,
                       ece_bins=ECE_BINS if ece_bins is None else ece_bins)
    settings = settings_of(ctx)
    result = build_table(engine_of(ctx), query)
    logged = log_table(settings, result) if log else None
    _print(result, format)
    if logged is not None:
        typer.echo(f"logged to MLflow run {logged['mlflow_run_id']} ({logged['run_name']!r} in experiment "
                   f"{logged['experiment']})", err=True)


def _print(result: Table, format: str) -> None:
    from difftpt_ops.services.reading.table_render import CSV_COLUMNS, csv_rows, to_latex, to_markdown

    if format == "json":
        print_json(result.to_dict())
    elif format == "markdown":
        sys.stdout.write(to_markdown(result))
    elif format == "latex":
        sys.stdout.write(to_latex(result))
    elif format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_rows(result))
    elif not result.rows:
        typer.echo("no finished tuning runs match; `difftpt-ops runs list` shows the runs")
    else:
        _print_rich(result)


def register(app: typer.Typer) -> None:
    """Mount `table` on the root app."""
    app.command("table")(table)
