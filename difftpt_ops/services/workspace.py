"""Opening the workspace: the database engine at the current schema, the artifact root's housekeeping."""

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


STALE_TEMP_AFTER_S = 3600.0  # a writer holds its temporary file for seconds; an hour-old one was killed


def remove_stale_temporaries(settings: Settings, *, older_than_s: float = STALE_TEMP_AFTER_S) -> int:
    """Delete the temporary files that writers killed mid-write (kill -9, a lost machine) left in the artifact
    root: generated images, stored view features, online checkpoints, class descriptions. Files younger than
    `older_than_s` may belong to a writer still running and are kept. Returns how many were deleted."""
    from difftpt_ops.services.running.checkpoints import CHECKPOINT_NAMESPACE
    from difftpt_ops.services.running.descriptions import NAMESPACE as DESCRIPTIONS
    from difftpt_ops.storage.artifacts import ArtifactStore
    from difftpt_ops.storage.features import NAMESPACE as FEATURES

    return sum(ArtifactStore(settings.artifact_root, namespace=namespace).remove_stale_temp(older_than_s=older_than_s)
               for namespace in ("generated", FEATURES, CHECKPOINT_NAMESPACE, DESCRIPTIONS))
