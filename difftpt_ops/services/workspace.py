"""Opening the workspace: the database engine at the current schema, the artifact root."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings
from difftpt_ops.core import clock
from difftpt_ops.db.session import database_clock_offset, ensure_schema, get_engine


def open_database(settings: Settings, *, auto_upgrade: bool | None = None) -> Engine:
    """Engine for the settings' database, checked reachable and at the current schema.

    The embedded SQLite workspace is upgraded automatically on first use; a shared server database
    is migrated once by `difftpt-ops db upgrade`, never implicitly by many workers at once. From then on the
    process's clock is the database server's (`core.clock`): hosts sharing it compare heartbeats on one clock.
    """
    if auto_upgrade is None:
        auto_upgrade = settings.is_sqlite
    if settings.is_sqlite:
        settings.workspace.mkdir(parents=True, exist_ok=True)
    engine = get_engine(settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    ensure_schema(engine, auto_upgrade=auto_upgrade)
    clock.follow(database_clock_offset(engine))
    return engine
