"""`difftpt-ops sql` is read-only for real, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from difftpt_ops.core.errors import InputError
from difftpt_ops.db.session import get_engine, session_scope, upgrade
from difftpt_ops.services.reading.sql import (
    check_readonly_query,
    ensure_reader_role,
    execute_readonly,
    run_readonly_sql,
)
from tests.conftest import scratch_database
from tests.factories import make_dataset_version, make_predictions, make_run

pytestmark = pytest.mark.integration

REFUSED = [
    "INSERT INTO runs (kind) VALUES ('x')",
    "UPDATE runs SET state = 'failed'",
    "DELETE FROM predictions",
    "DROP TABLE predictions",
    "ATTACH DATABASE 'other.db' AS other",
    "PRAGMA user_version = 7",
    "SELECT 1; DELETE FROM predictions",
    "SELECT 1; SELECT 2",
    "select 1 /* ; */ ; update runs set state = 'x'",
    "WITH doomed AS (SELECT id FROM runs) DELETE FROM runs WHERE id IN (SELECT id FROM doomed)",
    "/* harmless */ DELETE FROM predictions -- comment",
    "SELECT * INTO copy_of_runs FROM runs",
    "CREATE TABLE t AS SELECT 1",
]
# Writes disguised past a naive check: the connection itself must refuse them.
DISGUISED = [
    "WITH x AS (SELECT 1) INSERT INTO datasets (name, format, root, class_names, created_at) "
    "SELECT 'evil', 'f', '/', '[]', CURRENT_TIMESTAMP FROM x",
    "DELETE FROM predictions",
    "UPDATE runs SET state = 'failed'",
    "DROP VIEW run_summary",
    "SELECT 1; DELETE FROM predictions",
]


def _seed(engine: Engine) -> None:
    upgrade(engine)
    assert ensure_reader_role(engine) is None  # what `db upgrade` does after the migrations
    with session_scope(engine) as session:
        version = make_dataset_version(session, 6, 2)
        make_predictions(session, make_run(session, version), [True, False, True, True])


@pytest.fixture
def engine(database_url: str) -> Engine:
    engine = get_engine(database_url)
    _seed(engine)
    return engine


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, str]]:
    """One seeded database per backend for the tests that must leave it unchanged anyway."""
    with scratch_database(request.param, tmp_path_factory.mktemp("sql-db")) as url:
        engine = get_engine(url)
        _seed(engine)
        yield engine, url


def _counts(engine: Engine) -> tuple[int, int, int, str]:
    with engine.connect() as conn:
        return (conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar_one(),
                conn.execute(text("SELECT COUNT(*) FROM datasets")).scalar_one(),
                conn.execute(text("SELECT COUNT(*) FROM run_summary")).scalar_one(),
                conn.execute(text("SELECT state FROM runs")).scalar_one())


def test_writes_ddl_attach_and_stacked_statements_are_refused(shared: tuple[Engine, str]) -> None:
    """Each is an InputError naming the QUERY argument, and nothing changes."""
    engine, database_url = shared
    before = _counts(engine)
    for query in REFUSED:
        with pytest.raises(InputError) as caught:
            run_readonly_sql(database_url, query)
        assert caught.value.argument == "QUERY", query
    assert _counts(engine) == before


def test_the_connection_refuses_disguised_writes(shared: tuple[Engine, str]) -> None:
    """Bypassing the text check, the read-only connection still refuses every write."""
    engine, database_url = shared
    before = _counts(engine)
    for query in DISGUISED:
        with pytest.raises(InputError, match="read-only|only one statement") as caught:
            execute_readonly(database_url, query)
        assert caught.value.argument == "QUERY", query
    assert _counts(engine) == before


def test_reads_work_including_views_and_tricky_literals(shared: tuple[Engine, str]) -> None:
    """Quotes, comments, '%' and the replace() function are fine; views are queryable."""
    engine, database_url = shared
    columns, rows = run_readonly_sql(database_url, "SELECT run_id, done, top1 FROM run_summary;")
    assert columns == ["run_id", "done", "top1"] and rows[0][1:] == (4, 0.75)
    _, rows = run_readonly_sql(database_url, "SELECT 'it''s; DELETE', '%', replace('abc', 'b', 'x') -- DROP")
    assert rows == [("it's; DELETE", "%", "axc")]
    _, rows = run_readonly_sql(database_url, "select count(*) from prediction_detail where label_name like 'class%'")
    assert rows == [(4,)]
    with pytest.raises(InputError, match="no_such_table|does not exist|no such table"):
        run_readonly_sql(database_url, "SELECT * FROM no_such_table")


def test_cli_sql_prints_json_and_csv_and_refuses_writes(engine: Engine, cli_env: dict[str, str]) -> None:
    """--json is a list of objects, --csv a header and rows; a write exits 2 with one line."""
    from cli.main import app

    runner = CliRunner()
    out = runner.invoke(app, ["sql", "SELECT run_id, done FROM run_summary", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["done"] == 4
    out = runner.invoke(app, ["sql", "SELECT run_id, done FROM run_summary", "--csv"])
    assert out.stdout.splitlines()[0] == "run_id,done"
    out = runner.invoke(app, ["sql", "DELETE FROM predictions"])
    assert out.exit_code == 2 and "read-only" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("error: QUERY=DELETE FROM predictions:"), out.stderr
    # --max-rows: the footer says when rows were left out; exactly that many rows are printed in every format.
    three = "SELECT 1 AS n UNION ALL SELECT 2 UNION ALL SELECT 3"
    out = runner.invoke(app, ["sql", three, "--max-rows", "2", "--format", "tsv"])
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == ["n", "1", "2"]
    assert out.stderr.strip().splitlines() == ["2 row(s) shown; more exist (--max-rows 2)"]
    out = runner.invoke(app, ["sql", three, "--max-rows", "3", "--format", "tsv"])
    assert out.stdout.splitlines() == ["n", "1", "2", "3"] and out.stderr.strip().splitlines() == ["3 row(s)"]
    out = runner.invoke(app, ["sql", three, "--max-rows", "2", "--json"])
    assert json.loads(out.stdout) == [{"n": 1}, {"n": 2}]


def test_the_parser_knows_quotes_comments_and_dollar_quotes() -> None:
    """Semicolons and keywords inside literals or comments are not statements; each dialect its own way."""
    check_readonly_query("select 'a;b'; -- x; y\n")
    check_readonly_query("select $tag$ ; drop $tag$", "postgresql")
    # PostgreSQL nests block comments; SQLite does not, so the DELETE is code there.
    check_readonly_query("/* /* */ ; DELETE */ select 1", "postgresql")
    with pytest.raises(InputError):
        check_readonly_query("/* /* */ DELETE FROM runs /* */", "sqlite")
    check_readonly_query("SELECT E'\\' ; DROP' AS x", "postgresql")
    check_readonly_query("(SELECT 1) UNION (SELECT 2)")
    # PostgreSQL ends a -- comment at a carriage return too: what follows is code, and it is a COPY.
    with pytest.raises(InputError, match="only a SELECT|COPY"):
        check_readonly_query("--\rCOPY (SELECT 1) TO PROGRAM 'id' /*\nSELECT */", "postgresql")


def test_postgresql_runs_what_the_parser_checked() -> None:
    """The statement sent to PostgreSQL is the parser's rendering, without the user's comments."""
    rendered = check_readonly_query("SELECT 1 -- */ ; DELETE FROM runs\r, 2 /* x */", "postgresql")
    assert rendered == "SELECT 1, 2"
