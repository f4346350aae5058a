"""Idempotent bulk writes: INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Session

_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
_INSERT_IGNORE: dict[tuple[str, str], Any] = {}  # cached statements: compiling one costs more than a row
# SQLite limits bound parameters per statement (32766 in recent versions); stay well below.
_MAX_PARAMS = 30_000


def insert_ignore(session: Session, model: type[DeclarativeBase] | Table, rows: Sequence[dict[str, Any]]) -> int:
    """Insert `rows`, skipping any that collide with a unique key. Returns the rows actually inserted."""
    if not rows:
        return 0
    table: Table = model if isinstance(model, Table) else model.__table__  # type: ignore[assignment]
    insert = _INSERTS[session.get_bind().dialect.name]
    per_chunk = max(1, _MAX_PARAMS // max(1, len(rows[0])))
    inserted = 0
    for start in range(0, len(rows), per_chunk):
        chunk = rows[start:start + per_chunk]
        # rowcount is -1 for multi-row inserts on psycopg 3; RETURNING counts only the rows really inserted.
        statement = insert(table).values(list(chunk)).on_conflict_do_nothing().returning(*table.primary_key.columns)
        inserted += len(session.execute(statement).all())
    return inserted


def insert_many_ignore(executor: Connection | Session, model: Any, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING as one executemany of a cached statement.

    `insert_ignore` renders one multi-VALUES statement per call, whose compilation costs
    about 2 ms per row here: too slow for per-sample results. Rows must share their keys.
    """
    if not rows:
        return
    dialect = executor.get_bind().dialect.name if isinstance(executor, Session) else executor.dialect.name
    key = (dialect, model.__tablename__)
    if key not in _INSERT_IGNORE:
        _INSERT_IGNORE[key] = _INSERTS[dialect](model.__table__).on_conflict_do_nothing()
    executor.execute(_INSERT_IGNORE[key], list(rows))


def insert_new_ids(session: Session, model: Any, rows: list[dict[str, Any]]) -> list[int]:
    """Insert the rows that collide with no unique key; the ids of those inserted.

    RETURNING tells what was inserted on both dialects (PostgreSQL reports no rowcount for it).
    """
    insert = _INSERTS[session.get_bind().dialect.name]
    return list(session.scalars(insert(model.__table__).values(rows).on_conflict_do_nothing()
                                .returning(model.__table__.c.id)))
