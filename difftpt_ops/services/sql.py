"""`difftpt-ops sql`: one read-only query against the results database.

Two guards. The first is a check of the text (a small tokenizer that knows quotes, comments and
PostgreSQL dollar quotes): one statement, starting with SELECT/WITH/VALUES/EXPLAIN, no write or DDL
keyword. The second is the real one, the connection: SQLite opens the file with `mode=ro`, sets
`query_only`, forbids ATTACH and installs an authorizer that allows only reads; PostgreSQL runs the
query in a READ ONLY transaction through the extended protocol, which rejects stacked statements.
"""

from __future__ import annotations

import re
import sqlite3
import time
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy.engine import make_url

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import InputError, NotFoundError

ALLOWED_FIRST = frozenset({"SELECT", "WITH", "VALUES", "EXPLAIN"})
FORBIDDEN = frozenset({
    "INSERT", "UPDATE", "DELETE", "MERGE", "UPSERT", "REPLACE", "DROP", "CREATE", "ALTER", "TRUNCATE",
    "ATTACH", "DETACH", "PRAGMA", "VACUUM", "REINDEX", "GRANT", "REVOKE", "COPY", "INTO", "COMMIT",
    "ROLLBACK", "SAVEPOINT",
})
# REPLACE is also a string function: allowed when it is called, i.e. followed by "(".
_CALLABLE = frozenset({"REPLACE"})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
Rows = list[tuple[Any, ...]]


def split_statements(query: str, dialect: str = "sqlite") -> list[list[str]]:
    """Words (upper case) and punctuation of each statement, quotes and comments skipped."""
    statements: list[list[str]] = [[]]
    i, n = 0, len(query)
    while i < n:
        ch = query[i]
        if ch == ";":
            statements.append([])
            i += 1
        elif ch.isspace():
            i += 1
        elif query.startswith("--", i):
            end = query.find("\n", i)
            i = n if end < 0 else end + 1
        elif query.startswith("/*", i):
            i = _skip_block_comment(query, i, nested=dialect == "postgresql")
        elif ch in "'\"`" or (ch == "[" and dialect == "sqlite"):
            escapes = ch == "'" and dialect == "postgresql" and i > 0 and query[i - 1] in "eE"
            i = _skip_quoted(query, i, "]" if ch == "[" else ch, backslash=escapes)
            statements[-1].append("<quoted>")
        elif ch == "$" and dialect == "postgresql" and (tag := _DOLLAR_TAG.match(query, i)):
            end = query.find(tag.group(0), tag.end())
            i = n if end < 0 else end + len(tag.group(0))
            statements[-1].append("<quoted>")
        elif word := _WORD.match(query, i):
            statements[-1].append(word.group(0).upper())
            i = word.end()
        else:
            statements[-1].append(ch)
            i += 1
    return [s for s in statements if s]


def _skip_block_comment(query: str, i: int, *, nested: bool) -> int:
    depth, i = 1, i + 2
    while i < len(query) and depth:
        if nested and query.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif query.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    return i


def _skip_quoted(query: str, i: int, close: str, *, backslash: bool) -> int:
    i += 1
    while i < len(query):
        if backslash and query[i] == "\\":
            i += 2
        elif query[i] == close:
            if close != "]" and query.startswith(close * 2, i):  # doubled quote is an escaped quote
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return i


def check_readonly_query(query: str, dialect: str = "sqlite") -> None:
    """Raise InputError("sql", ...) unless `query` is one statement that only reads."""
    statements = split_statements(query, dialect)
    if not statements:
        raise InputError("sql", query, "empty query")
    if len(statements) > 1:
        raise InputError("sql", query, "only one statement is allowed (no ';' between statements)")
    tokens = statements[0]
    first = next((t for t in tokens if t != "("), "")
    if first not in ALLOWED_FIRST:
        raise InputError("sql", query, f"read-only: a query must start with {', '.join(sorted(ALLOWED_FIRST))}, "
                                       f"not {first or tokens[0]!r}")
    for position, token in enumerate(tokens):
        called = position + 1 < len(tokens) and tokens[position + 1] == "("
        if token in FORBIDDEN and not (token in _CALLABLE and called):
            raise InputError("sql", query, f"read-only: {token} is not allowed")


def run_readonly_sql(target: str | Settings, query: str, *, timeout_s: float = 60.0,
                     max_rows: int | None = None) -> tuple[list[str], Rows]:
    """Check `query`, then run it on a read-only connection; returns (column names, rows).

    Args:
        target: the database URL, or settings whose database_url is used.
        query: one SELECT / WITH / VALUES / EXPLAIN statement.
        timeout_s: the query is cancelled after this many seconds.
        max_rows: keep at most this many rows (None: all).
    """
    url = target.database_url if isinstance(target, Settings) else target
    dialect = make_url(url).get_backend_name()
    check_readonly_query(query, dialect)
    return execute_readonly(url, query, timeout_s=timeout_s, max_rows=max_rows)


def execute_readonly(url: str, query: str, *, timeout_s: float = 60.0,
                     max_rows: int | None = None) -> tuple[list[str], Rows]:
    """Run `query` on a read-only connection without the text check (the connection is the guard)."""
    if make_url(url).get_backend_name() == "sqlite":
        return _sqlite_readonly(url, query, timeout_s, max_rows)
    if make_url(url).get_backend_name() == "postgresql":
        return _postgres_readonly(url, query, timeout_s, max_rows)
    raise InputError("DIFFTPT_OPS_DATABASE_URL", url, "sql supports SQLite and PostgreSQL only")


# sqlite3 authorizer action codes that only read (SQLITE_READ, SELECT, FUNCTION, RECURSIVE CTE).
_SQLITE_READ_ACTIONS = frozenset({20, 21, 31, 33})


def _sqlite_authorizer(action: int, *_args: Any) -> int:
    return sqlite3.SQLITE_OK if action in _SQLITE_READ_ACTIONS else sqlite3.SQLITE_DENY


def _sqlite_readonly(url: str, query: str, timeout_s: float, max_rows: int | None) -> tuple[list[str], Rows]:
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
            raise _translate(query, exc, timed_out=time.monotonic() > deadline) from exc
        columns = [d[0] for d in cursor.description or ()]
        return columns, [tuple(row) for row in rows]
    finally:
        connection.close()


def _postgres_readonly(url: str, query: str, timeout_s: float, max_rows: int | None) -> tuple[list[str], Rows]:
    import psycopg

    from difftpt_ops.db.session import get_engine

    raw = get_engine(url).raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SET TRANSACTION READ ONLY")
        cursor.execute(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}")
        try:
            # Parameters (none) and binary results force the extended protocol: one statement only.
            cursor.execute(query.replace("%", "%%"), (), binary=True)
            rows = (cursor.fetchmany(max_rows) if max_rows is not None else cursor.fetchall()) \
                if cursor.description else []
        except psycopg.Error as exc:
            raise _translate(query, exc, timed_out=isinstance(exc, psycopg.errors.QueryCanceled)) from exc
        columns = [d.name for d in cursor.description or ()]
        return columns, [tuple(_plain(v) for v in row) for row in rows]
    finally:
        raw.rollback()
        raw.close()


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal) else value


_READONLY_HINTS = ("readonly", "read-only", "not authorized", "query_only", "too many attached")


def _translate(query: str, exc: Exception, *, timed_out: bool) -> InputError:
    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if timed_out:
        return InputError("sql", query, f"cancelled: the query ran past its time limit ({message})")
    if "one statement" in message or "multiple commands" in message:
        return InputError("sql", query, f"only one statement is allowed ({message})")
    if any(hint in message.lower() for hint in _READONLY_HINTS) or "SqlTransaction" in type(exc).__name__:
        return InputError("sql", query, f"read-only: the database refused a write ({message})")
    return InputError("sql", query, f"the database rejected the query: {message}")
