"""Every command's --help: flags without values, --quiet/--verbose, consistent argument names, examples last."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.unit

ARGUMENT_NAMES = {"RUN", "RUN_A", "RUN_B", "DATASET", "DIR", "QUERY"}


def _leaf_commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if hasattr(command, "commands"):
        return [leaf for name, sub in command.commands.items() for leaf in _leaf_commands(sub, (*path, name))]
    return [(path, command)]


LEAVES = _leaf_commands(typer.main.get_command(app))


def test_the_tree_has_every_group() -> None:
    """The walk sees the commands users know (guards the parametrised test below against an empty list)."""
    paths = {" ".join(path) for path, _ in LEAVES}
    assert {"status", "submit tune", "submit generate", "models check", "data add", "sql", "demo"} <= paths


@pytest.mark.parametrize("path", [" ".join(path) for path, _ in LEAVES])
def test_help_follows_the_conventions(path: str) -> None:
    """--quiet and --verbose everywhere, no `<bool>` value on a flag, RUN/DATASET names, examples at the end."""
    result = CliRunner().invoke(app, [*path.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "--quiet" in text and "--verbose" in text
    assert "<bool>" not in text
    usage = text.splitlines()[0]
    arguments = re.findall(r"\b[A-Z][A-Z_]+\b", usage.split("[OPTIONS]", 1)[-1])
    assert set(arguments) - {"ARGS"} <= ARGUMENT_NAMES, usage
    lines = [line.strip() for line in text.strip().splitlines()]
    assert "Examples:" in lines
    assert sum("Examples:" in line for line in lines) == 1, "examples once, in the epilog (not also in the docstring)"
    examples = lines[lines.index("Examples:") + 1:]
    assert examples and all(line.startswith("$ difftpt-ops ") for line in examples if line)


def test_data_printing_commands_take_format() -> None:
    """Commands with --json also take --format table|tsv|csv (export keeps its own --format)."""
    for path, command in LEAVES:
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        if "--json" in options:
            assert "--format" in options, path
