"""What every command shares: settings from the global options, the database, output, error translation."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from difftpt_ops.config import Settings, load_settings
from difftpt_ops.core.errors import DifftptError

console = Console()
err_console = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


class ErrorTranslatingGroup(TyperGroup):
    """Translate library errors once, at the edge: one line on stderr and the error's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DifftptError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted; finished work is stored, `difftpt-ops resume RUN` continues")
            ctx.exit(130)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def new_app(help_text: str) -> typer.Typer:
    return typer.Typer(help=help_text, cls=ErrorTranslatingGroup, no_args_is_help=True,
                       pretty_exceptions_enable=False, add_completion=False)


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
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def print_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    console.print(table)


def print_mapping(title: str | None, mapping: dict[str, Any]) -> None:
    print_table(title, ["key", "value"], [[k, v] for k, v in mapping.items()])
