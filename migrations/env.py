"""Alembic environment: migrates the engine handed over by difftpt_ops.db.session, or a URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Engine

from difftpt_ops.db import tables  # noqa: F401  (registers the tables on the metadata)
from difftpt_ops.db.base import Base

config = context.config
target_metadata = Base.metadata


def _engine() -> Engine:
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    from difftpt_ops.config import load_settings
    from difftpt_ops.db.session import get_engine

    url = context.get_x_argument(as_dictionary=True).get("url") or load_settings().database_url
    return get_engine(url)


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things in place; batch mode rebuilds the table.
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
