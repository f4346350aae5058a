"""`difftpt-ops status`: the progress of runs, once or watched (a live table, plain lines or JSON Lines).

Services are imported inside the command, so `status` never pays for torch or Celery.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import (
    JsonOpt,
    engine_of,
    err_console,
    for_scripts,
    human_bytes,
    info,
    parse_run_id,
    plain,
    print_json,
    print_table,
    settings_of,
)
from difftpt_ops.core.secrets import mask_url

if TYPE_CHECKING:
    from difftpt_ops.config import Settings


def _fmt_rate(run: dict[str, Any]) -> str:
    rate = run.get("throughput")
    # Generation runs report images per second; tune runs samples per second.
    return "" if rate is None else f"{rate:,.1f} {run.get('throughput_unit', 'samples')}/s"


def fmt_eta(run: dict[str, Any]) -> str:
    """A run's `eta_s` as 1h02m or 3m05s ("" when unknown)."""
    eta = run.get("eta_s")
    if eta is None:
        return ""
    minutes, seconds = divmod(int(eta), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _status_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for run in runs:
        workers = ", ".join(f"{w['worker']}[{w['gpu'] or '-'}]" for w in run.get("workers", []))
        disk = run.get("disk") or {}
        parts = [f"{disk['images']} images {human_bytes(disk['image_bytes'])}" if disk.get("images") else "",
                 f"{disk['features']} features {human_bytes(disk['feature_bytes'])}" if disk.get("features") else ""]
        images = ", ".join(part for part in parts if part)
        rows.append([run["run_id"], f"{run['kind']}/{run['method']}", run["dataset"], shown_state(run), run["done"],
                     run["failed"], run["pending"], _fmt_rate(run), fmt_eta(run), workers, images])
    return rows


_STATUS_COLUMNS = ["run", "kind", "dataset", "state", "done", "failed", "pending", "rate", "ETA", "workers",
                   "disk"]
_SCRIPT_COLUMNS = ["run", "kind", "method", "dataset", "state", "done", "failed", "pending", "throughput",
                   "throughput_unit", "eta_s", "workers", "images", "image_bytes", "features", "feature_bytes"]


def _script_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    """`--format tsv|csv`: the numbers as stored (per second, seconds, bytes), one value per column."""
    rows = []
    for run in runs:
        disk, rate, eta = run.get("disk") or {}, run.get("throughput"), run.get("eta_s")
        workers = " ".join(f"{w['worker']}[{w['gpu'] or '-'}]" for w in run.get("workers", []))
        rows.append([run["run_id"], run["kind"], run["method"], run["dataset"], shown_state(run), run["done"],
                     run["failed"], run["pending"], "" if rate is None else rate,
                     run.get("throughput_unit", "samples") if rate is not None else "",
                     "" if eta is None else eta, workers, disk.get("images", 0), disk.get("image_bytes", 0),
                     disk.get("features", 0), disk.get("feature_bytes", 0)])
    return rows


def _print_status(runs: list[dict[str, Any]]) -> None:
    if for_scripts():
        print_table(None, _SCRIPT_COLUMNS, _script_rows(runs))
    else:
        print_table(None, _STATUS_COLUMNS, _status_rows(runs))
    say = partial(typer.echo, err=for_scripts())  # a script reads one table from stdout: notes go to stderr
    for run in runs:
        for failure in run.get("failed_shards", []):
            error = mask_url(" ".join(failure["error"]))  # a stored error may quote a URL with its password
            say(f"run {run['run_id']} shard {failure['shard']} failed: {error}")
        for waiting in run.get("waiting_shards", []):
            say(f"run {run['run_id']} shard {waiting['shard']} waits: {waiting['reason']}")
        if run.get("error"):
            say(f"run {run['run_id']}: {run['error']}")
        if run.get("stopped"):
            say(stopped_line(run))


def shown_state(run: dict[str, Any]) -> str:
    """A run's state for tables: `stopped` for an active run nothing works on (stored as running)."""
    return "stopped" if run.get("stopped") else run["state"]


def stopped_line(run: dict[str, Any]) -> str:
    """Why nothing continues a stopped run, and the command that does."""
    run_id, idle = run["run_id"], run.get("idle_generations")
    if idle is None:
        return (f"run {run_id} is stopped: no worker holds or will receive its shards (interrupted, killed, "
                f"or never enqueued); `difftpt-ops resume {run_id}` continues it")
    if not idle:
        return (f"run {run_id} is stopped: it waits for generated images and no generation run makes them; "
                f"`difftpt-ops submit generate` for its dataset, then `difftpt-ops resume {run_id}`")
    unfinished = [g for g in idle if g["state"] not in ("finished", "finished_with_failures")]
    if not unfinished:  # the images exist: the run missed the wake-up
        return (f"run {run_id} is stopped: its generation is finished; `difftpt-ops resume {run_id}` continues it")
    runs = ", ".join(f"run {g['run_id']}: {g['state']}" for g in unfinished)
    return (f"run {run_id} is stopped: it waits for generated images and no generation run is at work ({runs}); "
            f"`difftpt-ops resume {unfinished[-1]['run_id']}`, then `difftpt-ops resume {run_id}`")


def status(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Argument(metavar="RUN", help="Run id (default: the active runs).")] = None,
    watch: Annotated[bool, typer.Option(
        "--watch", help="Refresh every 2 s until the runs end (Ctrl-C stops); with --json, JSON Lines.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Progress of runs: samples done / failed / pending, throughput, ETA, workers and GPUs, disk of their images.

    With --watch --json it prints JSON Lines: one JSON object per run per refresh, each with an
    `observed_at` timestamp, until no watched run is active (the last object of each run gives its final state).
    """
    from difftpt_ops.services.running.status import is_active, run_status

    run_id = parse_run_id(run) if run is not None else None
    settings, engine = settings_of(ctx), engine_of(ctx)
    if not watch:
        runs = _with_disk(engine, settings, run_status(engine, settings, run_id))
        if as_json:
            print_json(runs)
        elif runs:
            _print_status(runs)
        else:
            info("no active runs; `difftpt-ops runs list` shows every run, `difftpt-ops status RUN` one of them")
        return
    fetch = (lambda: run_status(engine, settings, run_id)) if run_id is not None else _active_then_ended(
        lambda ended: run_status(engine, settings, ended))
    try:
        _watch(fetch, is_active, as_json)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _active_then_ended(status_of: Any) -> Any:
    """What `status --watch` without RUN shows at each refresh: the active runs, and once more, in its final state
    (finished, failed, cancelled), each run an earlier refresh showed that is no longer active; without it the
    last line of a run that ended said `running`. `status_of(None)` is the active runs, `status_of(id)` one run."""
    watched: set[int] = set()

    def fetch() -> list[dict[str, Any]]:
        runs = status_of(None)
        active = {r["run_id"] for r in runs}
        ended = [row for run_id in sorted(watched - active, reverse=True) for row in status_of(run_id)]
        watched.clear()
        watched.update(active)
        return sorted(runs + ended, key=lambda r: -int(r["run_id"]))

    return fetch


def _with_disk(engine: Any, settings: Settings, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each run's disk use: the generated images it made or reads, the view features of its samples."""
    from difftpt_ops.services.reading.disk import run_disk_usage

    usage = run_disk_usage(engine, settings, [r["run_id"] for r in runs])
    empty = {"images": 0, "image_bytes": 0, "features": 0, "feature_bytes": 0}
    return [{**r, "disk": usage.get(r["run_id"], empty)} for r in runs]


def _watch(fetch: Any, is_active: Any, as_json: bool) -> None:
    """Poll every 2 s until no run is active: JSON Lines, a live table on a terminal, else plain lines."""
    from cli.common import PROGRESS_INTERVAL_S
    from difftpt_ops.core.clock import utcnow  # the database's clock, which the runs' timestamps are on

    live = _LiveTable() if not as_json and err_console.is_terminal and sys.stdout.isatty() else None
    last_lines = float("-inf")
    try:
        while True:
            runs = fetch()
            active = any(is_active(r["state"]) for r in runs)
            if as_json:
                observed = utcnow().isoformat()
                for run in runs:
                    sys.stdout.write(json.dumps({"observed_at": observed, **run}, default=str) + "\n")
                sys.stdout.flush()
            elif live is not None:
                live.show(runs)
            elif time.monotonic() - last_lines >= PROGRESS_INTERVAL_S or not active:
                for row in _status_rows(runs):
                    typer.echo(_status_line(row))
                last_lines = time.monotonic()
            if not active:
                return
            time.sleep(2.0)
    finally:
        if live is not None:
            live.stop()


def _status_line(row: list[Any]) -> str:
    """One run as a plain line for logs: the table's columns as `name value`."""
    return "  ".join(f"{name} {value}" for name, value in zip(_STATUS_COLUMNS, row, strict=True) if value != "")


class _LiveTable:
    """The status table redrawn in place on a terminal."""

    def __init__(self) -> None:
        from rich.live import Live

        self._live = Live(auto_refresh=False)
        self._live.start()

    def show(self, runs: list[dict[str, Any]]) -> None:
        from rich.table import Table

        table = Table()
        for column in _STATUS_COLUMNS:
            table.add_column(column)
        for row in _status_rows(runs):
            table.add_row(*[plain(str(value)) for value in row])
        self._live.update(table, refresh=True)

    def stop(self) -> None:
        self._live.stop()
