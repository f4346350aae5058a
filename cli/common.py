"""What every command shares: settings from the global options, the database, output, error translation."""

from __future__ import annotations

import csv
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from difftpt_ops.config import Settings, load_settings
from difftpt_ops.core.errors import DifftptError, InputError
from difftpt_ops.core.secrets import mask_url

console = Console()
err_console = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
EceBinsOpt = Annotated[int | None, typer.Option(
    "--ece-bins", help="Equal-width confidence bins of the ECE (default 15; C-TPT's code uses 20).",
    show_default=False)]


class ErrorTranslatingGroup(TyperGroup):
    """Translate library errors once, at the edge: one line on stderr and the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.parent is None:  # a new invocation (tests run many in one process): no run started yet
            CURRENT_RUN.run_id = None
        try:
            return super().invoke(ctx)
        except DifftptError as exc:
            # Masked here too: a library message may quote a URL with its password.
            # The value as typed: `escape` keeps `[x]` and emoji=False keeps `:cat:` (rich would make it an emoji).
            err_console.print(f"[bold red]error:[/] {escape(mask_url(str(exc)))}", soft_wrap=True, highlight=False,
                              emoji=False)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print(interrupted_line(CURRENT_RUN.run_id), soft_wrap=True, highlight=False, markup=False)
            ctx.exit(130)


@dataclass
class CurrentRun:
    """The run this invocation is executing in-process, for the Ctrl-C line; set when its execution starts."""

    run_id: int | None = None


CURRENT_RUN = CurrentRun()


def interrupted_line(run_id: int | None) -> str:
    """What Ctrl-C leaves: the run to resume, or that no run had started (one line)."""
    if run_id is None:
        return "interrupted before any run started; nothing to resume"
    return f"interrupted; run {run_id}'s finished work is stored, `difftpt-ops resume {run_id}` continues"


def run_label(kind: str, method: str) -> str:
    """`tune tpt`, but `generate` for a generation run (its method slot repeats the kind)."""
    return kind if method == kind else f"{kind} {method}"


def parse_run_id(value: str, argument: str = "RUN") -> int:
    """RUN arguments are integer run ids, parsed here so a bad one gets the one-line error naming it."""
    try:
        run_id = int(value)
    except ValueError:
        raise InputError(argument, value, "not a run id (an integer); see `difftpt-ops runs list`") from None
    if run_id < 1:
        raise InputError(argument, value, "run ids start at 1")
    return run_id


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def new_app(help_text: str, *, completion: bool = False) -> typer.Typer:
    """A command group; only the root sets `completion` (Typer's --install-completion / --show-completion)."""
    return typer.Typer(help=help_text, cls=ErrorTranslatingGroup, no_args_is_help=True,
                       pretty_exceptions_enable=False, add_completion=completion,
                       rich_markup_mode=None)  # plain click help: flags shown without a value type


@dataclass
class AppState:
    """Global options, resolved lazily so `--help` never touches the database."""

    workspace: str | None = None
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.workspace)
        return self._settings


def state(ctx: typer.Context) -> AppState:
    root = ctx.find_root()
    if not isinstance(root.obj, AppState):
        root.obj = AppState()
    return root.obj


def settings_of(ctx: typer.Context) -> Settings:
    return state(ctx).settings


def engine_of(ctx: typer.Context):  # type: ignore[no-untyped-def]
    from difftpt_ops.services.workspace import open_database

    return open_database(settings_of(ctx))


def print_json(payload: Any) -> None:
    # Stored errors (a shard's, a sync's) may quote a URL with its password: masked like every printed URL.
    sys.stdout.write(mask_url(json.dumps(payload, indent=2, default=str)) + "\n")


def print_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    """A table in the command's --format: a rich table (never cut to 80 columns when piped), TSV or CSV."""
    cells = [["" if v is None else mask_url(str(v)) for v in row] for row in rows]  # as print_json
    if for_scripts():
        _write_delimited(columns, cells, OUTPUT.table_format)
        return
    table = Table(title=plain(title), show_lines=False)
    for column in columns:
        table.add_column(column)
    for row in cells:
        table.add_row(*map(plain, row))
    table_console().print(table)


def plain(value: str | None) -> Text | None:
    """A value for a rich table as stored: a plain string there is rich markup, so `/w/[v2]/clip` would lose
    `[v2]` and `:cat:` become an emoji."""
    return None if value is None else Text(value)


def for_scripts() -> bool:
    """Whether tables print as tsv / csv (`--format`): for scripts, so numbers go out as stored (fractions)."""
    return OUTPUT.table_format is not TableFormat.table


def table_console() -> Console:
    """Where rich tables go: on a terminal rich fits the window; in a pipe or file it would cut them at 80
    columns, so there it gets all the width it needs."""
    return console if console.is_terminal else Console(width=_UNBOUNDED_WIDTH)


def _write_delimited(columns: list[str], rows: list[list[str]], table_format: TableFormat) -> None:
    if table_format is TableFormat.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
        return
    # TSV: tabs and newlines inside a cell would break the row, so they become spaces.
    for row in [columns, *rows]:
        sys.stdout.write("\t".join(" ".join(cell.split()) for cell in row) + "\n")


def format_percent(value: float) -> str:
    """An accuracy (a fraction) as people read it: percent with one decimal. The demo and `results` share it."""
    return f"{100 * value:.1f}%"


def print_mapping(title: str | None, mapping: dict[str, Any]) -> None:
    print_table(title, ["key", "value"], [[k, v] for k, v in mapping.items()])


# -- output conventions shared by every command: --quiet, --verbose, --format, progress ------------------------

_UNBOUNDED_WIDTH = 100_000
PROGRESS_INTERVAL_S = 10.0  # plain progress lines in logs and pipes: often enough to see life, rare enough to read


class TableFormat(str, Enum):
    """How commands print tables: rich boxes, or plain TSV/CSV for scripts."""

    table = "table"
    tsv = "tsv"
    csv = "csv"


@dataclass
class OutputOptions:
    """The per-invocation output flags (--quiet, --verbose, --format), set before the command body runs."""

    quiet: bool = False
    verbose: bool = False
    table_format: TableFormat = TableFormat.table


OUTPUT = OutputOptions()


def set_output(*, quiet: bool, verbose: bool, table_format: TableFormat) -> None:
    """Record the flags and set logging: warnings by default, errors only with --quiet, info with --verbose."""
    if quiet and verbose:
        raise InputError("--quiet", True, "choose one of --quiet and --verbose")
    OUTPUT.quiet, OUTPUT.verbose, OUTPUT.table_format = quiet, verbose, table_format
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s", force=True)


def info(line: str) -> None:
    """A progress or status line for people (stderr), silenced by --quiet."""
    if not OUTPUT.quiet:
        err_console.print(line, soft_wrap=True, highlight=False, markup=False, emoji=False)


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class PlainProgress:
    """The progress sink for logs and pipes: one plain line at start, every `interval_s`, and at the end.

    Each line says samples done of total, the rate since start and the ETA, so a log read later shows
    how the run went without terminal control codes.
    """

    def __init__(self, write: Callable[[str], None], *, interval_s: float = PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, ticker: bool = True) -> None:
        self._write, self._interval, self._clock = write, interval_s, clock
        self._label, self._total, self._completed, self._start_completed = "", 0, 0, 0
        self._started_at = self._last_line_at = 0.0
        self._last_line_completed: int | None = None
        self._lock = threading.Lock()
        # A sample can take longer than the interval (model loading, a slow GPU): a timer keeps the lines steady.
        # One timer per run: the runs of a sweep share the sink, each started in turn.
        self._ticks = ticker
        self._stopped = threading.Event()

    def start(self, run_id: int, total: int, completed: int) -> None:
        CURRENT_RUN.run_id = run_id
        self.stop()  # the previous run of a sweep (the executor starts each run; stop comes once, at the end)
        with self._lock:  # the previous run's timer may still be writing a line
            self._label, self._total = f"run {run_id}", total
            self._completed = self._start_completed = completed
            self._started_at = self._clock()
            self._last_line_completed = None
        self._line()
        self._stopped = threading.Event()
        if self._ticks:
            threading.Thread(target=self._tick, args=(self._stopped,), name="progress-lines", daemon=True).start()

    def advance(self, done: int, failed: int) -> None:
        self._completed += done + failed
        if self._clock() - self._last_line_at >= self._interval:
            self._line()

    def stop(self) -> None:
        self._stopped.set()
        if self._label and self._last_line_completed != self._completed:
            self._line()

    def _tick(self, stopped: threading.Event) -> None:
        while not stopped.wait(self._interval / 4):
            if self._clock() - self._last_line_at >= self._interval:
                self._line()

    def _line(self) -> None:
        with self._lock:
            self._write_line()

    def _write_line(self) -> None:
        now = self._clock()
        elapsed, new = now - self._started_at, self._completed - self._start_completed
        rate = new / elapsed if elapsed > 0 and new > 0 else None
        eta = (self._total - self._completed) / rate if rate else None
        rate_text = f"{rate:.2f} samples/s" if rate else "- samples/s"
        self._write(f"{self._label}: {self._completed}/{self._total} samples, {rate_text}, ETA {_format_eta(eta)}")
        self._last_line_at, self._last_line_completed = now, self._completed


class ProgressBar:
    """The progress sink on a terminal: a rich bar on stderr with samples/s and ETA."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err_console,
                                 transient=True)
        self.task: Any = None
        self._last = 0.0

    def start(self, run_id: int, total: int, completed: int) -> None:
        CURRENT_RUN.run_id = run_id
        self.task = self.progress.add_task(f"run {run_id}", total=total, completed=completed, rate="")
        self._state = next(task for task in self.progress.tasks if task.id == self.task)
        self.progress.start()

    def advance(self, done: int, failed: int) -> None:
        self.progress.advance(self.task, done + failed)
        now = time.monotonic()
        if now - self._last > 0.5:  # formatting the rate per sample would cost more than the noop method
            speed = self._state.speed
            self.progress.update(self.task, rate=f"{speed:,.0f} samples/s" if speed else "")
            self._last = now

    def stop(self) -> None:
        self.progress.stop()


class _NoProgress:
    def start(self, run_id: int, total: int, completed: int) -> None:
        CURRENT_RUN.run_id = run_id  # the Ctrl-C line names it

    def advance(self, done: int, failed: int) -> None: ...
    def stop(self) -> None: ...


def progress_sink(*, hidden: bool = False) -> ProgressBar | PlainProgress | _NoProgress:
    """A bar on a terminal, plain lines on stderr otherwise, nothing with --quiet or when `hidden`."""
    if hidden or OUTPUT.quiet:
        return _NoProgress()
    if err_console.is_terminal:
        return ProgressBar()
    return PlainProgress(lambda line: err_console.print(line, soft_wrap=True, highlight=False, markup=False,
                                                          emoji=False))


def human_bytes(count: float) -> str:
    """A byte count in B, KB, MB, GB or TB (powers of 1000), as status and the estimates print it."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
