"""The `difftpt-ops` root command: global options and the command groups."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import JsonOpt, new_app, print_json, print_mapping, settings_of, state
from cli.conventions import install_conventions
from difftpt_ops import __version__

app = new_app("Test-time adaptation of CLIP (zero-shot, TPT, DiffTPT and the other methods `methods list` shows): "
              "datasets, generation, runs, results.",
              completion=True)
config_app = new_app("Show the effective settings.")
db_app = new_app("Database schema.")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"difftpt-ops {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    workspace: Annotated[str | None, typer.Option(
        "--workspace", "-w", help="Workspace directory (overrides DIFFTPT_OPS_WORKSPACE).")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Settings come from DIFFTPT_OPS_* environment variables and an optional TOML file."""
    state(ctx).workspace = workspace


@config_app.command("show")
def config_show(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Print the effective settings, passwords masked."""
    values = settings_of(ctx).masked()
    if as_json:
        print_json(values)
    else:
        print_mapping("difftpt-ops settings", values)


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option("--url", help="Database URL (default: the settings').")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the schema migrations to the database (any URL)."""
    from difftpt_ops.core.errors import InputError
    from difftpt_ops.db.session import check_connection, current_revision, get_engine, upgrade

    try:
        engine = get_engine(url or settings_of(ctx).database_url)
    except InputError as exc:
        if url is None:
            raise
        raise InputError("--url", exc.value, exc.problem) from None  # the option the user typed
    check_connection(engine)
    before = current_revision(engine)
    upgrade(engine)
    after = current_revision(engine)
    from difftpt_ops.services.reading.sql import ensure_reader_role

    if (note := ensure_reader_role(engine)) is not None:  # PostgreSQL: the role `sql` runs as
        typer.echo(f"warning: {note}", err=True)
    shown = engine.url.render_as_string(hide_password=True)
    if as_json:
        print_json({"database": shown, "from": before, "to": after})
    else:
        typer.echo(f"{shown}: schema {before or 'empty'} -> {after}")


def _register_groups() -> None:
    """Mount the command groups that live in their own modules."""
    import importlib

    for module_name in ("cli.models_cmds", "cli.data_cmds", "cli.jobs", "cli.methods_cmds", "cli.results_cmds",
                        "cli.table_cmds", "cli.demo"):
        importlib.import_module(module_name).register(app)


_register_groups()
install_conventions(app)  # after every group: --quiet/--verbose/--format and examples on all


def main() -> None:
    from difftpt_ops.config import install_secret_masking

    install_secret_masking()
    app()


if __name__ == "__main__":
    main()
