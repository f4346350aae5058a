"""The tables and the migrations describe the same schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from difftpt_ops.db import tables  # noqa: F401
from difftpt_ops.db.base import Base
from difftpt_ops.db.session import SCHEMA_HEAD, current_revision, get_engine, head_revision, upgrade

pytestmark = pytest.mark.integration


def test_migrations_match_tables(database_url: str) -> None:
    """Alembic's autogenerate comparison finds no difference after upgrading to head."""
    engine = get_engine(database_url)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_is_idempotent_and_creates_every_table(database_url: str) -> None:
    """A second upgrade changes nothing and every mapped table exists."""
    engine = get_engine(database_url)
    upgrade(engine)
    upgrade(engine)
    names = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= names


def test_schema_head_constant_is_alembic_head() -> None:
    """Opening a database compares against SCHEMA_HEAD; it must name the newest migration."""
    assert SCHEMA_HEAD == head_revision()
