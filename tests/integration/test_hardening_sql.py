"""`difftpt-ops sql` is no way into the PostgreSQL server, run as the superuser the tests connect with.

Each bypass string is sent as a user would send it. Whatever happens (refused by the parser, by the
read-only transaction, by the reader role, or run as a harmless SELECT): no program runs on the server,
no server file is read, and nothing in the database or the cluster's roles changes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from typer.testing import CliRunner

from difftpt_ops.config import load_settings
from difftpt_ops.core.errors import InputError
from difftpt_ops.db.session import get_engine, session_scope, upgrade
from difftpt_ops.services.reading import sql as sql_service
from difftpt_ops.services.reading.sql import READER_ROLE, ensure_reader_role, execute_readonly, run_readonly_sql
from tests.conftest import POSTGRES_ADMIN_URL
from tests.factories import make_dataset_version, make_predictions, make_run

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SECRET = f"difftpt-secret-{uuid.uuid4().hex}"


def bypass_strings(marker: Path, secret: Path) -> list[str]:
    """The issue's bypass strings, pointed at a marker a program would create and a file holding SECRET."""
    touch = f"touch {marker}"
    return [
        # A -- comment ended by a carriage return (PostgreSQL ends it there; a checker reading to \n does not).
        f"--\rCOPY (SELECT 1) TO PROGRAM '{touch}' /*\nSELECT */",
        f"SELECT 1 --\r, pg_read_file('{secret}')",
        f"SELECT 1 --\r; COPY (SELECT 1) TO PROGRAM '{touch}'",
        # E-strings: a backslash escapes the quote only inside E'...'.
        f"SELECT E'\\' ; COPY (SELECT 1) TO PROGRAM ''{touch}'' --'",
        f"SELECT E'\\\\', pg_read_file('{secret}') --'",
        f"SELECT 'a\\' , pg_read_file('{secret}') --'",
        # Dollar quoting.
        f"SELECT $$ ; COPY (SELECT 1) TO PROGRAM '{touch}' ; $$",
        f"SELECT $x$ $$ $x$, pg_read_file('{secret}') -- $x$",
        f"SELECT 1 $$; COPY (SELECT 1) TO PROGRAM '{touch}'; $$",
        # Nested comments (PostgreSQL nests them).
        f"/* /* */ ; COPY (SELECT 1) TO PROGRAM '{touch}' ; /* */ */ SELECT 1",
        f"SELECT 1 /* /* */ */, pg_read_file('{secret}') /* */",
        # Straight in.
        f"COPY (SELECT 1) TO PROGRAM '{touch}'",
        f"COPY runs TO PROGRAM '{touch}'",
        f"SELECT pg_read_file('{secret}')",
        f"SELECT pg_read_binary_file('{secret}')",
        f"SELECT * FROM pg_ls_dir('{secret.parent}')",
        f"SELECT pg_stat_file('{secret}')",
        f"SELECT lo_import('{secret}')",
        f"SELECT lo_get(lo_import('{secret}'))",
        "SELECT set_config('role', 'postgres', false)",
        f"SELECT set_config('role', 'postgres', true), "
        f"query_to_xml('SELECT pg_read_file(''{secret}'')', true, false, '')",
        "SELECT set_config('session_authorization', 'postgres', false)",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        f"SELECT query_to_xml('SELECT pg_read_file(''{secret}'')', true, false, '')",
        "SET ROLE postgres",
        "RESET ROLE",
        "SET SESSION AUTHORIZATION postgres",
        "SET SESSION AUTHORIZATION DEFAULT",
        "SELECT 1 --\rRESET ROLE",
        "WITH gone AS (DELETE FROM predictions RETURNING 1) SELECT count(*) FROM gone",
        "SELECT * INTO stolen FROM runs",
        "CREATE TABLE stolen AS SELECT * FROM runs",
        "ALTER ROLE difftpt_ops_reader SUPERUSER",
        f"GRANT pg_read_server_files TO {READER_ROLE}",
    ]


@pytest.fixture
def seeded(postgres_url: str) -> Iterator[tuple[Engine, str]]:
    engine = get_engine(postgres_url)
    upgrade(engine)
    assert ensure_reader_role(engine) is None
    with session_scope(engine) as session:
        version = make_dataset_version(session, 6, 2)
        make_predictions(session, make_run(session, version), [True, False, True, True])
    yield engine, postgres_url


@pytest.fixture
def server_files(tmp_path: Path) -> tuple[Path, Path]:
    """A folder the server's own user may write to (for the marker) and a readable secret file in it."""
    folder = tmp_path / "server"
    folder.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(folder, 0o777)
    secret = folder / "secret.txt"
    secret.write_text(SECRET + "\n")
    os.chmod(secret, 0o644)
    return folder / "marker", secret


def _state(engine: Engine) -> tuple[object, ...]:
    """What must not change: rows, tables, and the cluster's roles and their attributes and memberships."""
    with engine.connect() as conn:
        return (
            conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar_one(),
            conn.execute(text("SELECT state FROM runs")).scalar_one(),
            tuple(conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"))),
            tuple(conn.execute(text("SELECT rolname, rolsuper, rolcanlogin, rolcreaterole FROM pg_roles ORDER BY 1"))),
            tuple(conn.execute(text("SELECT roleid, member FROM pg_auth_members ORDER BY 1, 2"))),
            conn.execute(text("SELECT COUNT(*) FROM pg_largeobject_metadata")).scalar_one(),
        )


def test_the_tests_connect_as_a_superuser() -> None:
    """The guarantees below are meant for the worst case: a superuser connection."""
    admin = create_engine(POSTGRES_ADMIN_URL)
    with admin.connect() as conn:
        assert conn.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar_one()
    admin.dispose()


def test_bypass_strings_execute_nothing_read_nothing_change_nothing(seeded: tuple[Engine, str],
                                                                   server_files: tuple[Path, Path]) -> None:
    """Through `sql` (parser, then connection): every string is refused or harmless."""
    engine, url = seeded
    marker, secret = server_files
    before = _state(engine)
    refused = 0
    for query in bypass_strings(marker, secret):
        try:
            columns, rows = run_readonly_sql(url, query)
        except InputError as exc:
            refused += 1
            assert exc.argument == "QUERY" and SECRET not in str(exc) and "\n" not in str(exc), query
        else:
            assert SECRET not in repr((columns, rows)), query
        assert not marker.exists(), f"a program ran on the server: {query!r}"
    assert _state(engine) == before
    assert refused >= len(bypass_strings(marker, secret)) - 6  # the string-literal ones may run as SELECTs


def test_the_reader_role_alone_stops_files_programs_and_writes(seeded: tuple[Engine, str],
                                                               server_files: tuple[Path, Path]) -> None:
    """Without the parser, the READ ONLY transaction and the reader role still refuse each of these."""
    engine, url = seeded
    marker, secret = server_files
    before = _state(engine)
    for query in [f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'", f"COPY runs TO '{marker}'",
                  f"SELECT pg_read_file('{secret}')", f"SELECT * FROM pg_ls_dir('{secret.parent}')",
                  f"SELECT pg_stat_file('{secret}')", f"SELECT lo_import('{secret}')",
                  f"SELECT query_to_xml('SELECT pg_read_file(''{secret}'')', true, false, '')",
                  "DELETE FROM predictions", "DROP VIEW run_summary", "SELECT 1; DELETE FROM predictions"]:
        with pytest.raises(InputError) as caught:
            execute_readonly(url, query)
        assert SECRET not in str(caught.value), query
        assert not marker.exists(), query
    assert _state(engine) == before


def test_a_role_switch_that_gets_past_the_parser_is_caught(seeded: tuple[Engine, str]) -> None:
    """Should a query switch the role back (set_config is refused by the parser), its result is withheld."""
    engine, url = seeded
    with pytest.raises(InputError, match="changed the role"):
        execute_readonly(url, "SELECT set_config('role', 'postgres', true)")


def test_the_reader_role_holds_select_and_nothing_else(seeded: tuple[Engine, str]) -> None:
    """db upgrade creates it without login or superuser, not a member of the file roles; twice is fine."""
    engine, _ = seeded
    assert ensure_reader_role(engine) is None
    with engine.connect() as conn:
        attributes = conn.execute(text(
            "SELECT rolsuper, rolcanlogin, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls FROM pg_roles "
            "WHERE rolname = :r"), {"r": READER_ROLE}).one()
        assert not any(attributes)
        assert not conn.execute(text("SELECT bool_or(pg_has_role(:r, oid, 'MEMBER')) FROM pg_roles WHERE rolname IN "
                                     "('pg_read_server_files', 'pg_write_server_files', 'pg_execute_server_program')"),
                                {"r": READER_ROLE}).scalar_one()
        privileges = set(conn.execute(text(
            "SELECT DISTINCT privilege_type FROM information_schema.role_table_grants WHERE grantee = :r"),
            {"r": READER_ROLE}).scalars())
        assert privileges == {"SELECT"}
        assert conn.execute(text("SELECT has_table_privilege(:r, 'run_summary', 'SELECT')"),
                            {"r": READER_ROLE}).scalar()


def test_without_the_role_sql_refuses_and_says_how_to_set_it_up(seeded: tuple[Engine, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A database whose upgrade could not create the role: one line naming db upgrade and the read-only URL."""
    _, url = seeded
    monkeypatch.setattr(sql_service, "READER_ROLE", f"difftpt_missing_{uuid.uuid4().hex[:8]}")
    with pytest.raises(InputError) as caught:
        run_readonly_sql(url, "SELECT 1")
    message = str(caught.value)
    assert "db upgrade" in message and "DIFFTPT_OPS_READONLY_DATABASE_URL" in message and "\n" not in message


@pytest.fixture
def login_reader(seeded: tuple[Engine, str]) -> Iterator[str]:
    """A login user holding SELECT only, as an administrator would make for DIFFTPT_OPS_READONLY_DATABASE_URL."""
    engine, url = seeded
    name = f"difftpt_test_ro_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {name} LOGIN"))
        conn.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {name}"))
    try:
        yield make_url(url).set(username=name).render_as_string(hide_password=False)
    finally:
        from difftpt_ops.db.session import dispose_engines

        dispose_engines()
        with engine.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {name}"))
            conn.execute(text(f"DROP ROLE {name}"))


def test_a_read_only_url_is_used_and_a_superuser_one_refused(seeded: tuple[Engine, str], login_reader: str,
                                                             workspace: Path, server_files: tuple[Path, Path]) -> None:
    engine, url = seeded
    _, secret = server_files
    settings = load_settings(workspace, env={"DIFFTPT_OPS_DATABASE_URL": url,
                                             "DIFFTPT_OPS_READONLY_DATABASE_URL": login_reader})
    _, rows = run_readonly_sql(settings, "SELECT current_user, COUNT(*) FROM predictions GROUP BY 1")
    assert rows == [(make_url(login_reader).username, 4)]
    with pytest.raises(InputError):
        execute_readonly(url, f"SELECT pg_read_file('{secret}')", readonly_url=login_reader)
    superuser = load_settings(workspace, env={"DIFFTPT_OPS_DATABASE_URL": url,
                                              "DIFFTPT_OPS_READONLY_DATABASE_URL": POSTGRES_ADMIN_URL})
    with pytest.raises(InputError, match="DIFFTPT_OPS_READONLY_DATABASE_URL=.*may do more than read"):
        run_readonly_sql(superuser, "SELECT 1")


def test_cli_refuses_the_carriage_return_bypass_in_one_line(seeded: tuple[Engine, str], workspace: Path,
                                                            server_files: tuple[Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.main import app

    engine, url = seeded
    marker, _ = server_files
    monkeypatch.setenv("DIFFTPT_OPS_WORKSPACE", str(workspace))
    monkeypatch.setenv("DIFFTPT_OPS_DATABASE_URL", url)
    out = CliRunner().invoke(app, ["sql", "--", f"--\rCOPY (SELECT 1) TO PROGRAM 'touch {marker}' /*\nSELECT */"])
    assert out.exit_code == 2 and len(out.stderr.strip().splitlines()) == 1 and "COPY" in out.stderr
    assert not marker.exists()


@pytest.fixture
def owner_database(postgres_url: str) -> Iterator[str]:
    """A database owned by a login user that may not create roles, as many hosted PostgreSQL users are."""
    ensure_reader_role(get_engine(postgres_url))  # the role exists in the cluster (made by an administrator)
    owner = f"difftpt_test_owner_{uuid.uuid4().hex[:8]}"
    name = f"difftpt_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {owner} LOGIN NOCREATEROLE"))
        conn.execute(text(f'CREATE DATABASE "{name}" OWNER {owner}'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(username=owner, database=name).render_as_string(hide_password=False)
    finally:
        from difftpt_ops.db.session import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f"DROP ROLE {owner}"))
        admin.dispose()


def test_an_owner_that_may_not_create_roles_gets_a_warning_and_sql_says_how(owner_database: str,
                                                                          workspace: Path) -> None:
    """db upgrade migrates and warns in one line; sql then refuses in one line naming both ways to set it up."""
    import subprocess
    import sys

    from tests.integration.test_jobs_support import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFTPT_OPS_")}
    env.update({"DIFFTPT_OPS_WORKSPACE": str(workspace), "PYTHONPATH": str(REPO_ROOT)})
    done = subprocess.run([sys.executable, "-m", "cli.main", "db", "upgrade", "--url", owner_database], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "DIFFTPT_OPS_READONLY_DATABASE_URL" in warning[0], done.stderr
    with pytest.raises(InputError) as caught:
        run_readonly_sql(owner_database, "SELECT COUNT(*) FROM runs")
    message = str(caught.value)
    assert f"cannot switch to the role {READER_ROLE}" in message and "db upgrade" in message
    assert "DIFFTPT_OPS_READONLY_DATABASE_URL" in message and "\n" not in message
