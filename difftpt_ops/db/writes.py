"""Idempotent bulk writes: INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session

# SQLite limits bound parameters per statement (32766 in recent versions); stay well below.
_MAX_PARAMS = 30_000


def insert_ignore(session: Session, model: type[DeclarativeBase] | Table, rows: Sequence[dict[str, Any]]) -> int:
    """Insert `rows`, skipping any that collide with a unique key. Returns the rows actually inserted."""
    if not rows:
        return 0
    table: Table = model if isinstance(model, Table) else model.__table__  # type: ignore[assignment]
    dialect = session.get_bind().dialect.name
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect]
    per_chunk = max(1, _MAX_PARAMS // max(1, len(rows[0])))
    inserted = 0
    for start in range(0, len(rows), per_chunk):
        chunk = rows[start:start + per_chunk]
        # rowcount is -1 for multi-row inserts on psycopg 3; RETURNING counts only the rows really inserted.
        statement = insert(table).values(list(chunk)).on_conflict_do_nothing().returning(*table.primary_key.columns)
        inserted += len(session.execute(statement).all())
    return inserted
