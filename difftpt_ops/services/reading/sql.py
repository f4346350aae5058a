"""`difftpt-ops sql`: one read-only query against the results database.

Three guards, each enough on its own for what it covers:

1. A real SQL parser (sqlglot, in the database's dialect) accepts exactly one SELECT (WITH ... SELECT,
   UNION, ...) with no write, DDL, SELECT INTO or row lock anywhere inside, and no call of a function that
   reads server files, changes settings or roles, or runs SQL text. On PostgreSQL the statement that runs is
   the parser's own rendering of what it checked, so no quirk of comments or quoting can make the server
   read something else than what was checked.
2. The transaction: PostgreSQL runs the statement in a READ ONLY transaction through the extended protocol
   (one statement only), on a connection of its own that is closed afterwards.
3. The identity: PostgreSQL runs it as `difftpt_ops_reader`, a role without login, superuser or file
   privileges that holds only SELECT on the project's tables and views (created and granted by
   `difftpt-ops db upgrade`, switched to with SET ROLE inside the transaction), or as the user of
   DIFFTPT_OPS_READONLY_DATABASE_URL. SQLite opens the file with `mode=ro`, sets `query_only`, forbids ATTACH
   and installs an authorizer that allows only reads.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy.engine import make_url

from difftpt_ops.config import Settings, mask_url
from difftpt_ops.core.errors import InputError, NotFoundError

READER_ROLE = "difftpt_ops_reader"
READONLY_URL_ENV = "DIFFTPT_OPS_READONLY_DATABASE_URL"
Rows = list[tuple[Any, ...]]

# Functions no read-only query needs: server files and large objects, settings and roles (set_config can
# switch `role` back to the session user), SQL text run by a function (it would escape the parse), backend
# and replication control, and SQLite's extension loading and file helpers.
_FORBIDDEN_FUNCTIONS = re.compile(
    r"^(set_config|query_to_xml\w*|query_to_xmlschema|cursor_to_xml\w*|ts_stat|ts_rewrite|dblink\w*|lo_\w+"
    r"|pg_read_\w+|pg_ls_\w+|pg_stat_file|pg_file_\w+|pg_terminate_backend|pg_cancel_backend|pg_reload_conf"
    r"|pg_rotate_logfile|pg_promote|pg_switch_wal|pg_create_\w+|pg_drop_\w+|pg_replication_\w+|pg_logical_\w+"
    r"|pg_import_system_collations|pg_advisory_\w+|load_extension|readfile|writefile|fts3_tokenizer|edit)$")
_DIALECTS = {"sqlite": "sqlite", "postgresql": "postgres"}


def _forbidden_nodes() -> tuple[type, ...]:
    from sqlglot import exp

    names = ("DML", "DDL", "Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter", "Command", "Copy",
             "Into", "Set", "TruncateTable", "Lock", "Pragma", "Attach", "Detach", "Transaction", "Commit",
             "Rollback", "Grant", "Revoke", "Analyze", "Use")
    return tuple(getattr(exp, name) for name in names if hasattr(exp, name))


def check_readonly_query(query: str, dialect: str = "sqlite") -> str:
    """The query as one read-only SELECT, rendered by the parser; raise InputError("QUERY", ...) otherwise.

    Args:
        query: the user's text.
        dialect: the database backend, "sqlite" or "postgresql".
    """
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    logging.getLogger("sqlglot").setLevel(logging.ERROR)  # "falling back to a Command" is our refusal, not a log
    read = _DIALECTS.get(dialect, dialect)
    try:
        # A trailing comment after the last ';' parses as an empty statement holding it: not a statement.
        statements = [s for s in sqlglot.parse(query, read=read) if s is not None and not isinstance(s, exp.Semicolon)]
    except SqlglotError as exc:
        raise InputError("QUERY", _one_line(query), f"not one valid SQL statement ({_first_line(exc)})") from exc
    if not statements:
        raise InputError("QUERY", _one_line(query), "empty query")
    if len(statements) > 1:
        raise InputError("QUERY", _one_line(query), "only one statement is allowed (no ';' between statements)")
    tree = statements[0]
    if not isinstance(tree, (exp.Select, exp.SetOperation, exp.Subquery)):
        kind = str(tree.this).split()[0] if isinstance(tree, exp.Command) else tree.key
        raise InputError("QUERY", _one_line(query), f"read-only: only a SELECT (or WITH ... SELECT) is allowed, "
                                                  f"not {kind.upper()}")
    for node in tree.walk():
        if isinstance(node, _forbidden_nodes()):
            raise InputError("QUERY", _one_line(query), f"read-only: {node.key.upper()} is not allowed")
        if isinstance(node, exp.Func):
            name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
            if _FORBIDDEN_FUNCTIONS.match(name):
                raise InputError("QUERY", _one_line(query), f"read-only: the function {name}() is not allowed")
    return tree.sql(dialect=read, comments=False)


def _one_line(query: str) -> str:
    """The query for an error message: one line, whatever its line breaks (\\r included)."""
    return " ".join(query.split())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def run_readonly_sql(target: str | Settings, query: str, *, timeout_s: float = 60.0,
                     max_rows: int | None = None) -> tuple[list[str], Rows]:
    """Check `query`, then run it on a read-only connection; returns (column names, rows).

    Args:
        target: the database URL, or settings (their database URL, and their read-only URL if set).
        query: one SELECT or WITH ... SELECT statement.
        timeout_s: the query is cancelled after this many seconds (> 0).
        max_rows: keep at most this many rows (None: all; >= 0).
    """
    check_limits(timeout_s, max_rows)
    url = target.database_url if isinstance(target, Settings) else target
    readonly_url = target.readonly_database_url if isinstance(target, Settings) else None
    checked = check_readonly_query(query, _backend(url))
    # PostgreSQL runs what the parser checked (see the module docstring); SQLite's authorizer guards its own.
    runnable = checked if _backend(url) == "postgresql" else query
    return execute_readonly(url, runnable, timeout_s=timeout_s, max_rows=max_rows, readonly_url=readonly_url,
                            shown_query=query)


def check_limits(timeout_s: float, max_rows: int | None) -> None:
    """Raise InputError naming --timeout or --max-rows when they cannot mean anything."""
    if not timeout_s > 0:  # also NaN
        raise InputError("--timeout", timeout_s, "must be a number of seconds > 0")
    if max_rows is not None and max_rows < 0:
        raise InputError("--max-rows", max_rows, "must be >= 0")


def _backend(url: str) -> str:
    from difftpt_ops.db.session import normalise_url

    return make_url(normalise_url(url)).get_backend_name()


def execute_readonly(url: str, query: str, *, timeout_s: float = 60.0, max_rows: int | None = None,
                     readonly_url: str | None = None, shown_query: str | None = None) -> tuple[list[str], Rows]:
    """Run `query` on a read-only connection without the parser's check (the connection is the guard)."""
    shown = query if shown_query is None else shown_query
    if _backend(url) == "sqlite":
        return _sqlite_readonly(url, query, timeout_s, max_rows, shown)
    if _backend(url) == "postgresql":
        return _postgres_readonly(url, query, timeout_s, max_rows, readonly_url=readonly_url, shown=shown)
    raise InputError("DIFFTPT_OPS_DATABASE_URL", mask_url(url), "sql supports SQLite and PostgreSQL only")


# sqlite3 authorizer action codes that only read (SQLITE_READ, SELECT, FUNCTION, RECURSIVE CTE).
_SQLITE_READ_ACTIONS = frozenset({20, 21, 31, 33})


def _sqlite_authorizer(action: int, *_args: Any) -> int:
    return sqlite3.SQLITE_OK if action in _SQLITE_READ_ACTIONS else sqlite3.SQLITE_DENY


def _sqlite_readonly(url: str, query: str, timeout_s: float, max_rows: int | None,
                     shown: str) -> tuple[list[str], Rows]:
    database = make_url(url).database
    if not database or database == ":memory:" or not Path(database).is_file():
        raise NotFoundError("DIFFTPT_OPS_DATABASE_URL", url, "no database file to query")
    connection = sqlite3.connect(f"file:{quote(str(Path(database).resolve()))}?mode=ro", uri=True, timeout=10)
    try:
        connection.execute("PRAGMA query_only = ON")
        connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        connection.set_authorizer(_sqlite_authorizer)
        deadline = time.monotonic() + timeout_s
        connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            cursor = connection.execute(query)  # sqlite3 itself refuses a second statement
            rows = cursor.fetchmany(max_rows) if max_rows is not None else cursor.fetchall()
        except sqlite3.Error as exc:
            raise _translate(shown, exc, timed_out=time.monotonic() > deadline) from exc
        columns = [d[0] for d in cursor.description or ()]
        return columns, [tuple(row) for row in rows]
    finally:
        connection.close()


_SETUP_HINT = (f"run `difftpt-ops db upgrade` as a user that may create roles (it creates {READER_ROLE}, "
               f"a role without login holding SELECT only), or set {READONLY_URL_ENV} to a user that holds "
               "SELECT only")
# Built-in roles whose members read or write server files or run programs on the server.
_FILE_ROLES = ("pg_read_server_files", "pg_write_server_files", "pg_execute_server_program")


def _postgres_readonly(url: str, query: str, timeout_s: float, max_rows: int | None, *,
                       readonly_url: str | None, shown: str) -> tuple[list[str], Rows]:
    import psycopg

    raw = _private_connection(readonly_url or url)
    try:
        cursor = raw.cursor()
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}")
        reader = _become_reader(cursor, readonly_url)
        try:
            # Parameters (none) and binary results force the extended protocol: one statement only.
            cursor.execute(query.replace("%", "%%"), (), binary=True)
            rows = (cursor.fetchmany(max_rows) if max_rows is not None else cursor.fetchall()) \
                if cursor.description else []
            columns = [d.name for d in cursor.description or ()]
        except psycopg.Error as exc:
            raise _translate(shown, exc, timed_out=isinstance(exc, psycopg.errors.QueryCanceled)) from exc
        cursor.execute("SELECT current_user")
        if cursor.fetchone()[0] != reader:  # the parser refuses every known way; say so if one is missed
            raise InputError("QUERY", _one_line(shown), "read-only: the query changed the role it runs as")
        return columns, [tuple(_plain(v) for v in row) for row in rows]
    finally:
        raw.rollback()
        raw.close()


def _private_connection(url: str) -> Any:
    """A connection of its own (not pooled), closed after the query: no state outlives it."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.pool import NullPool

    from difftpt_ops.core.errors import ServiceUnavailableError
    from difftpt_ops.db.session import normalise_url

    engine = create_engine(normalise_url(url), poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        return engine.raw_connection()
    except OperationalError as exc:
        raise ServiceUnavailableError(f"database {mask_url(url)} is unreachable "
                                      f"({mask_url(_first_line(exc.orig or exc))})") from exc


def _become_reader(cursor: Any, readonly_url: str | None) -> str:
    """SET ROLE to the reader role (or stay the read-only URL's user) after checking it holds no more than SELECT.

    Raises:
        InputError: the role is missing, cannot be switched to, or may do more than read tables.
    """
    import psycopg

    if readonly_url is None:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER_ROLE,))
        if cursor.fetchone() is None:
            raise InputError("sql", "(PostgreSQL)", f"the read-only role {READER_ROLE} does not exist; {_SETUP_HINT}")
        try:
            cursor.execute(f"SET LOCAL ROLE {READER_ROLE}")
        except psycopg.Error as exc:
            raise InputError("sql", "(PostgreSQL)", f"cannot switch to the role {READER_ROLE} "
                                                     f"({_first_line(exc)}); {_SETUP_HINT}") from exc
    argument = READONLY_URL_ENV if readonly_url else "sql"
    cursor.execute("SELECT current_user, rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls "
                   "OR " + " OR ".join(f"pg_has_role(current_user, '{r}', 'MEMBER')" for r in _FILE_ROLES)
                   + " FROM pg_roles WHERE rolname = current_user")
    user, privileged = cursor.fetchone()
    if privileged:
        raise InputError(argument, mask_url(readonly_url) if readonly_url else user,
                         f"the user {user} may do more than read (superuser, role/database creation, replication, "
                         f"or server files); {_SETUP_HINT}")
    return str(user)


def ensure_reader_role(engine: Any) -> str | None:
    """Create the read-only role `sql` runs as and grant it SELECT on the project's tables and views.

    Idempotent; run by `db upgrade` after the migrations. Returns None when done, else one line saying why
    it could not (the connecting user may not create roles) and what to do instead.
    """
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    if engine.dialect.name != "postgresql":
        return None
    statements = [
        # Two upgrades at once may both try to create the role: the loser's duplicate error is harmless.
        f"""DO $$ BEGIN
              IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
                CREATE ROLE {READER_ROLE} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
                  NOINHERIT;
              END IF;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
            END $$""",
        f"GRANT USAGE ON SCHEMA {{schema}} TO {READER_ROLE}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {{schema}} TO {READER_ROLE}",
        # A user that is not a superuser needs membership to SET ROLE (PostgreSQL 16: the SET option).
        f"""DO $$ BEGIN
              IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                 AND NOT pg_has_role(current_user, '{READER_ROLE}', 'MEMBER') THEN
                EXECUTE format('GRANT {READER_ROLE} TO %I', current_user);
              END IF;
            END $$""",
    ]
    try:
        with engine.begin() as connection:
            schema = connection.execute(text("SELECT quote_ident(current_schema())")).scalar_one()
            for statement in statements:
                connection.execute(text(statement.replace("{schema}", schema)))
    except DBAPIError as exc:
        return (f"sql on PostgreSQL is not set up: could not create or grant the role {READER_ROLE} "
                f"({_first_line(exc.orig or exc)}); ask an administrator to run `difftpt-ops db upgrade`, "
                f"or set {READONLY_URL_ENV} to a user that holds SELECT only")
    return None


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal) else value


_READONLY_HINTS = ("readonly", "read-only", "not authorized", "query_only", "too many attached")


def _translate(query: str, exc: Exception, *, timed_out: bool) -> InputError:
    message = mask_url(_first_line(exc))
    if timed_out:
        return InputError("QUERY", _one_line(query), f"cancelled: the query ran past its time limit ({message})")
    if "one statement" in message or "multiple commands" in message:
        return InputError("QUERY", _one_line(query), f"only one statement is allowed ({message})")
    if any(hint in message.lower() for hint in _READONLY_HINTS) or "SqlTransaction" in type(exc).__name__:
        return InputError("QUERY", _one_line(query), f"read-only: the database refused a write ({message})")
    return InputError("QUERY", _one_line(query), f"the database rejected the query: {message}")
