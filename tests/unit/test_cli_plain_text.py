"""What the user typed or stored is printed as it is: rich's markup (`[x]`) and emoji codes (`:cat:`) are not applied
to values in error lines or table cells."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.unit

VALUE = "x:cat:[bold]y[/]"


def test_an_error_line_quotes_the_value_as_typed() -> None:
    """QA: `results x:cat` printed `error: RUN=x🐱 not a run id` (the `:cat:` of `x:cat: not...` became an emoji)."""
    from cli.main import app

    result = CliRunner().invoke(app, ["results", VALUE])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: RUN={VALUE}: not a run id (an integer); see `difftpt-ops runs list`"


@pytest.mark.parametrize("fmt", ["table", "tsv"])
def test_table_cells_and_titles_are_printed_as_stored(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A model folder `/w/[v2]/clip` showed as `/w//clip` in a rich table, and `:cat:` as an emoji."""
    from cli.common import OUTPUT, TableFormat, print_table

    before = OUTPUT.table_format
    OUTPUT.table_format = TableFormat(fmt)
    try:
        print_table(f"title {VALUE}", ["model"], [[f"/w/[v2]/clip {VALUE}"]])
    finally:
        OUTPUT.table_format = before
    out = capsys.readouterr().out
    assert f"/w/[v2]/clip {VALUE}" in out
    if fmt == "table":
        assert f"title {VALUE}" in out


@pytest.mark.parametrize(("args", "line"), [
    (["submit", "tune", "--dataset", "d", "--method", "tpt", "--limit", "abc"],
     "error: --limit=abc: Input should be a valid integer, unable to parse string as an integer"),
    (["submit", "tune", "--dataset", "d", "--method", "ecalp", "--orders", "1.5"],
     "error: --orders=1.5: Input should be a valid integer, unable to parse string as an integer"),
    (["runs", "list", "--sweep", "x"],
     "error: --sweep=x: Input should be a valid integer, unable to parse string as an integer"),
])
def test_a_value_typer_cannot_convert_is_named_with_its_value(args: list[str], line: str) -> None:
    """QA: `--limit abc` said "Invalid value for '--limit': Input should be a valid integer" without the value
    (typer 0.29's coercion leaves it out); every other error names the option and the value."""
    from cli.main import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    [printed] = result.output.strip().splitlines()
    assert printed.split(" (see `")[0] == line and printed.endswith(" --help`)"), printed
