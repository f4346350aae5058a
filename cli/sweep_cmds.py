"""Sweeps and seeds on the command line: `submit tune --sweep/--seeds/--yes` and the groups in `runs list`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cli.common import print_json, print_table

SweepOpt = Annotated[list[str] | None, typer.Option(
    "--sweep", help="Sweep a method setting, KEY=V1,V2,... (repeatable): one run per grid point, e.g. "
    "--sweep steps=1,2,4 --sweep selection_p=0.05,0.1.")]
SeedsOpt = Annotated[str | None, typer.Option(
    "--seeds", help="Comma-separated seeds, one run per seed (per grid point with --sweep), e.g. --seeds 0,1,2.")]
YesOpt = Annotated[bool, typer.Option("--yes", help="Submit a sweep of more than 200 runs.")]
ListSweepOpt = Annotated[int | None, typer.Option(
    "--sweep", help="Only the runs of this sweep, with their grid points.")]


def submit_grid(engine: Any, settings: Any, *, grid_items: list[str] | None, seeds: str | None, confirmed: bool,
                as_json: bool, **submit_args: Any) -> None:
    """Plan the grid, submit a run per point (each attaches to an existing run with its spec), print the sweep."""
    from difftpt_ops.services.running.sweeps import parse_seeds, parse_sweep, submit_sweep

    result = submit_sweep(engine, settings, grid=parse_sweep(grid_items), seeds=parse_seeds(seeds),
                          confirmed=confirmed, **submit_args)
    if as_json:
        print_json(result.to_dict())
        return
    verb = "created" if result.created else "attached to"
    typer.echo(f"{verb} sweep {result.sweep_id}: {len(result.points)} run(s), {result.new_runs} new")
    print_table(None, ["run", "point", "new", "state"],
                [[p["run_id"], _point_text(p["point"]), "yes" if p["created"] else "no", p["state"]]
                 for p in result.points])


def _point_text(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def with_groups(engine: Any, runs: list[dict[str, Any]], sweep: int | None) -> list[dict[str, Any]]:
    """Add each run's sweeps and grid point; with `sweep`, keep only its runs, ordered by grid point."""
    from difftpt_ops.services.reading.groups import sweep_run_ids, sweeps_of_runs

    if sweep is not None:
        keep = set(sweep_run_ids(engine, sweep))
        runs = [r for r in runs if r["run_id"] in keep]
    groups = sweeps_of_runs(engine, [r["run_id"] for r in runs])
    out = []
    for run in runs:
        member = groups.get(run["run_id"], [])
        shown = next((m for m in member if m["sweep_id"] == sweep), member[-1] if member else None)
        out.append({**run, "sweeps": [m["sweep_id"] for m in member], "point": shown["point"] if shown else None})
    if sweep is not None:
        out.sort(key=lambda r: _point_text(r["point"] or {}))
    return out


def group_text(run: dict[str, Any]) -> str:
    """`sweep 3: steps=2 seed=1` for a run in a sweep, empty otherwise."""
    if not run.get("sweeps"):
        return ""
    label = "sweeps " + ",".join(map(str, run["sweeps"])) if len(run["sweeps"]) > 1 else f"sweep {run['sweeps'][0]}"
    return f"{label}: {_point_text(run['point'] or {})}"
