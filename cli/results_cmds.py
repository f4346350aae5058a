"""`difftpt-ops results | compare | export | sql | mlflow sync`: what users do with finished runs."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import (
    EceBinsOpt,
    JsonOpt,
    engine_of,
    for_scripts,
    format_percent,
    new_app,
    parse_run_id,
    print_json,
    print_mapping,
    print_table,
    settings_of,
)
from difftpt_ops.core.errors import InputError
from difftpt_ops.core.secrets import mask_url
from difftpt_ops.services.reading.stats import ECE_BINS

mlflow_app = new_app("MLflow: bring the tracking server up to date with the database.")

RunArg = Annotated[str, typer.Argument(metavar="RUN", help="Run id (`difftpt-ops runs list`).")]  # parse_run_id
ResultsCsvOpt = Annotated[bool, typer.Option(
    "--csv", help="Print the results as one CSV row, columns named as the --json keys (with --by-class, a row per "
                  "class); --format csv prints the key / value table instead. Both keep fractions.")]
CsvOpt = Annotated[bool, typer.Option("--csv", help="Print CSV.")]


# Accuracies, their differences and intervals print as percent with one decimal, as the demo prints them;
# --json, --csv and --format tsv|csv keep fractions.
PERCENT_KEYS = frozenset({"top1", "top5", "zeroshot_top1", "gain", "ece", "top1_ci95", "top1_a", "top1_b",
                          "difference", "difference_ci95", "top1_mean", "top1_std", "top1_min", "top1_max"})


def _fmt(value: Any, key: str | None = None) -> Any:
    if for_scripts():  # fractions, as --json
        return value
    number = format_percent if key in PERCENT_KEYS else (lambda v: f"{v:.4f}")
    if isinstance(value, float):
        return number(value)
    if isinstance(value, list | tuple) and value and all(isinstance(v, float) for v in value):
        return "[" + ", ".join(number(v) for v in value) + "]"
    return value


def _split_intervals(mapping: dict[str, Any]) -> dict[str, Any]:
    """For tsv / csv: an interval [low, high] (`*_ci95`) as two keys `*_ci95_low` and `*_ci95_high`, the columns
    `results --csv` has, so a script reads numbers, not a bracketed pair."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if key.endswith("_ci95"):
            low, high = value if isinstance(value, list | tuple) and len(value) == 2 else (None, None)
            out.update({f"{key}_low": low, f"{key}_high": high})
        else:
            out[key] = value
    return out


def _one_format(as_json: bool, as_csv: bool) -> None:
    if as_json and as_csv:
        raise InputError("--csv", True, "choose one of --json and --csv")


def _write_csv(columns: list[str], rows: list[list[Any]]) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow(columns)
    writer.writerows(rows)


def results(ctx: typer.Context, run_arg: RunArg,
            by_class: Annotated[bool, typer.Option("--by-class", help="Accuracy per class.")] = False,
            ece_bins: EceBinsOpt = None, as_json: JsonOpt = False, as_csv: ResultsCsvOpt = False) -> None:
    """Top-1, top-5, zero-shot top-1 on the same samples, gain, ECE, progress and time per sample."""
    from difftpt_ops.services.reading.results import run_results

    run = parse_run_id(run_arg)
    _one_format(as_json, as_csv)
    payload = run_results(engine_of(ctx), run, by_class=by_class, ece_bins=ECE_BINS if ece_bins is None else ece_bins)
    classes = payload.pop("classes", None)
    orders = payload.pop("orders", None)  # online runs with sibling order seeds
    if as_json:
        print_json({**payload, **({"classes": classes} if by_class else {}), **({"orders": orders} if orders else {})})
    elif as_csv and by_class:
        columns = ["label", "name", "n", "correct", "top1", "zeroshot_top1", "gain"]
        _write_csv(columns, [[c[k] for k in columns] for c in classes or []])
    elif as_csv:
        flat = {k: v for k, v in payload.items() if k != "top1_ci95"}
        ci = payload.get("top1_ci95") or [None, None]
        _write_csv([*flat, "top1_ci95_low", "top1_ci95_high"], [[*flat.values(), *ci]])
    elif for_scripts():  # one table per output, fractions
        if by_class:
            columns = ["label", "name", "n", "correct", "top1", "zeroshot_top1", "gain"]
            print_table("per class", columns, [[c[k] for k in columns] for c in classes or []])
        else:
            print_mapping(f"run {run}", _split_intervals(payload))
    else:
        print_mapping(f"run {run}", {k: _fmt(v, k) for k, v in payload.items()})
        _print_orders(orders)
        if by_class:
            columns = ["label", "name", "n", "correct", "top1", "zeroshot_top1", "gain"]
            print_table("per class", columns, [[_fmt(c[k], k) for k in columns] for c in classes or []])


def compare(ctx: typer.Context,
            run_a_arg: Annotated[str, typer.Argument(metavar="RUN_A", help="First run id.")],
            run_b_arg: Annotated[str, typer.Argument(metavar="RUN_B", help="Second run id.")],
            as_json: JsonOpt = False) -> None:
    """Paired comparison on the samples both runs finished: 2x2 counts, difference with 95% CI, McNemar p."""
    from difftpt_ops.services.reading.results import compare_runs

    run_a, run_b = parse_run_id(run_a_arg, "RUN_A"), parse_run_id(run_b_arg, "RUN_B")
    payload = compare_runs(engine_of(ctx), run_a, run_b)
    if as_json:
        print_json(payload)
        return
    if for_scripts():  # one key / value table (--json has the groups)
        keys = ["paired_samples", "both_right", "only_a", "only_b", "both_wrong", "top1_a", "top1_b", "difference",
                "difference_ci95", "ci_method", "mcnemar_p"]
        print_mapping(None, _split_intervals({k: payload[k] for k in keys}))
        return
    a, b = payload["run_a"], payload["run_b"]
    print_table(f"run {run_a} ({a['method']}) vs run {run_b} ({b['method']}) on {payload['paired_samples']} "
                "paired samples", ["", f"B={run_b} right", f"B={run_b} wrong"],
                [[f"A={run_a} right", payload["both_right"], payload["only_a"]],
                 [f"A={run_a} wrong", payload["only_b"], payload["both_wrong"]]])
    keys = ["top1_a", "top1_b", "difference", "difference_ci95", "ci_method", "mcnemar_p"]
    print_mapping(None, {k: _fmt(payload[k], k) for k in keys})
    if payload["same_model_other_weights"]:
        typer.echo(f"note: both runs name the model {a['model']}, but with other weights (sha256 "
                   f"{a['weights'][:12]} vs {b['weights'][:12]}): its folder changed between them")
    _print_orders(payload.get("orders_a"), f"A={run_a}: ")
    _print_orders(payload.get("orders_b"), f"B={run_b}: ")
    _print_groups(payload.get("groups_a"), f"A={run_a}: ")
    _print_groups(payload.get("groups_b"), f"B={run_b}: ")


def _print_groups(groups: dict[str, Any] | None, prefix: str = "") -> None:
    """A run's sweeps, and top-1 over the runs that repeat it with other seeds."""
    if not groups:
        return
    for sweep in groups.get("sweeps", []):
        point = " ".join(f"{k}={v}" for k, v in sweep["point"].items())
        typer.echo(f"{prefix}in sweep {sweep['sweep_id']} at {point}")
    seeds = groups.get("seeds")
    if seeds:
        keys = ["top1_mean", "top1_std", "top1_min", "top1_max", "all_finished"]
        print_mapping(f"{prefix}top-1 over {seeds['n_runs']} seeds (runs {', '.join(map(str, seeds['runs']))})",
                      {k: _fmt(seeds[k], k) for k in keys})


def _print_orders(orders: dict[str, Any] | None, prefix: str = "") -> None:
    """Top-1 over the order seeds of an online run's group (runs that differ only by order seed)."""
    if orders:
        runs = ", ".join(map(str, orders["runs"]))
        keys = ["top1_mean", "top1_std", "top1_min", "top1_max", "all_finished"]
        print_mapping(f"{prefix}top-1 over {orders['n_runs']} stream orders (runs {runs})",
                      {k: _fmt(orders[k], k) for k in keys})


def export(ctx: typer.Context, run_arg: RunArg,
           format: Annotated[str, typer.Option("--format", help="parquet or csv.")] = "parquet",
           output: Annotated[Path | None, typer.Option("--output", "-o",
                                                       help="File to write (default: ./run-RUN.FORMAT).")] = None,
           as_json: JsonOpt = False) -> None:
    """Write the run's per-sample predictions (with paths and class names) to Parquet, or to CSV plus
    FILE.provenance.json (what made them)."""
    from difftpt_ops.services.reading.results import EXPORT_FORMATS, export_run

    run = parse_run_id(run_arg)
    if format not in EXPORT_FORMATS:
        raise InputError("--format", format, f"must be one of {', '.join(EXPORT_FORMATS)}")
    payload = export_run(engine_of(ctx), run, output or Path(f"run-{run}.{format}"), format)
    if as_json:
        print_json(payload)
    else:
        typer.echo(f"run {run}: {payload['rows']} predictions -> {payload['path']}")
        if "provenance_path" in payload:
            typer.echo(f"what made them (run, spec, weights, versions) -> {payload['provenance_path']}")


def sql(ctx: typer.Context,
        query: Annotated[str, typer.Argument(metavar="QUERY", help="One read-only SELECT/WITH statement.")],
        as_json: JsonOpt = False, as_csv: CsvOpt = False,
        max_rows: Annotated[int | None, typer.Option("--max-rows", help="Print at most this many rows.")] = None,
        timeout: Annotated[float, typer.Option("--timeout", help="Cancel the query after this many seconds.")] = 60.0,
        ) -> None:
    """Run one read-only query (views: run_summary, run_class_accuracy, prediction_detail, run_pair_comparison)."""
    from difftpt_ops.services.reading.sql import check_limits, run_readonly_sql

    _one_format(as_json, as_csv)
    check_limits(timeout, max_rows)  # before opening the database: a bad option creates nothing
    engine_of(ctx)  # the database exists and is at the current schema (views included)
    # One row past --max-rows tells whether the result was cut off; it is never printed.
    columns, rows = run_readonly_sql(settings_of(ctx), query, timeout_s=timeout,
                                     max_rows=None if max_rows is None else max_rows + 1)
    more = max_rows is not None and len(rows) > max_rows
    rows = rows[:max_rows] if more else rows
    if as_json:
        print_json([dict(zip(columns, row, strict=True)) for row in rows])
    elif as_csv:
        _write_csv(columns, [list(row) for row in rows])
    else:
        print_table(None, columns, [[_fmt(v) for v in row] for row in rows])
        typer.echo(f"{len(rows)} row(s) shown; more exist (--max-rows {max_rows})" if more else f"{len(rows)} row(s)",
                   err=True)


@mlflow_app.command("sync")
def mlflow_sync(ctx: typer.Context,
                run: Annotated[str | None, typer.Argument(metavar="RUN",
                                                          help="Run id (default: every run marked for sync).")] = None,
                every: Annotated[bool, typer.Option(
                    "--all", help="Sync every run, marked or not: repairs runs MLflow shows in a stale state "
                                  "(finished runs of a --seeds or --sweep submit that older versions left RUNNING).")
                ] = False,
                as_json: JsonOpt = False) -> None:
    """Log to MLflow what it missed: params, running top-1, final metrics, artifacts, status. Idempotent."""
    from difftpt_ops.services.reading.reporting import sync_runs

    settings = settings_of(ctx)
    if every and run is not None:
        raise InputError("--all", True, f"syncs every run: give it or RUN ({run}), not both")
    outcomes = sync_runs(engine_of(ctx), settings, None if run is None else parse_run_id(run), every=every)
    if as_json:
        print_json(outcomes)
    elif not outcomes:
        typer.echo("nothing to sync: every run is up to date in MLflow")
    else:
        rows = [[o["run_id"], o.get("experiment", ""), o.get("mlflow_run_id", ""), "yes" if o["synced"] else "no",
                 o.get("error", ", ".join(o.get("artifacts", [])))] for o in outcomes]
        print_table(f"MLflow sync ({mask_url(settings.mlflow_tracking_uri)})",
                    ["run", "experiment", "mlflow run", "synced", "artifacts / error"], rows)
    if any(not o["synced"] for o in outcomes):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Mount the result commands on the root app."""
    app.command("results")(results)
    app.command("compare")(compare)
    app.command("export")(export)
    app.command("sql")(sql)
    app.add_typer(mlflow_app, name="mlflow")
