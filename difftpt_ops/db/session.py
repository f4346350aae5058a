"""Engines, sessions and migrations for any database URL (SQLite embedded, PostgreSQL distributed)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from difftpt_ops.core import clock
from difftpt_ops.core.errors import InputError, ServiceUnavailableError
from difftpt_ops.core.secrets import mask_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# The newest migration. Kept here so that opening a database needs no alembic import (0.7 s per CLI call);
# tests/integration/test_schema.py checks it equals alembic's head.
SCHEMA_HEAD = "0009"
_ENGINES: dict[str, Engine] = {}
_LOCK = threading.Lock()


def _sqlite_pragmas(busy_timeout_ms: int):  # type: ignore[no-untyped-def]
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets readers work while one writer commits; the busy timeout makes writers wait, not fail.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return on_connect


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain postgresql:// URLs; reject what SQLAlchemy cannot parse."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise InputError("DIFFTPT_OPS_DATABASE_URL", mask_url(url), "not a database URL (sqlite:///PATH or "
                         "postgresql://USER@HOST/DB)") from exc
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def get_engine(url: str, *, busy_timeout_ms: int = 60_000) -> Engine:
    """One engine per URL per process (engines pool connections; creating many leaks them)."""
    url = normalise_url(url)
    with _LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            engine = _create_engine(url, busy_timeout_ms)
            _ENGINES[url] = engine
        return engine


def _create_engine(url: str, busy_timeout_ms: int) -> Engine:
    parsed = make_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                _sqlite_folder(parsed.database, parsed.render_as_string())
            engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})
            event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms))
            return engine
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    except (NoSuchModuleError, ArgumentError, ImportError) as exc:
        raise InputError("DIFFTPT_OPS_DATABASE_URL", parsed.render_as_string(),
                         f"unsupported database driver ({exc})") from exc


def _sqlite_folder(database: str, url: str) -> None:
    """The SQLite file's folder must exist (the workspace's is created before this): a mistyped path would
    otherwise create folders and an empty database anywhere, and every command would then report what that
    empty database lacks. A path that cannot hold a file is bad input."""
    path = Path(database)
    if path.is_dir():
        raise InputError("DIFFTPT_OPS_DATABASE_URL", url, "names a folder, not a database file")
    if not path.parent.is_dir():
        raise InputError("DIFFTPT_OPS_DATABASE_URL", url, f"the folder {path.parent} does not exist (it is not "
                                                          "created: create it, or check the path)")


def dispose_engines() -> None:
    """Close pooled connections (after fork, and in tests)."""
    with _LOCK:
        for engine in _ENGINES.values():
            engine.dispose()
        _ENGINES.clear()


def check_connection(engine: Engine) -> None:
    """Raise ServiceUnavailableError with what to do when the database cannot be reached."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        shown = engine.url.render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ServiceUnavailableError(
            f"database {shown} is unreachable ({reason}); check DIFFTPT_OPS_DATABASE_URL and that the server runs"
        ) from exc


def database_clock_offset(engine: Engine) -> timedelta:
    """How far the database server's clock is ahead of this host's (zero for SQLite, a file on this host):
    the server's clock_timestamp() against the midpoint of the round trip that read it."""
    if engine.dialect.name == "sqlite":
        return timedelta(0)
    with engine.connect() as connection:
        before = clock.local_now()
        server = connection.scalar(text("SELECT clock_timestamp()"))
        after = clock.local_now()
    return clock.as_utc(server) - (before + (after - before) / 2)


def _alembic_config(engine: Engine):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    config = _alembic_config(None)  # type: ignore[arg-type]
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    if not inspect(engine).has_table("alembic_version"):
        return None
    with engine.connect() as connection:
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision`."""
    from alembic import command

    command.upgrade(_alembic_config(engine), revision)


def ensure_schema(engine: Engine, *, auto_upgrade: bool) -> None:
    """Make sure the schema is at head: upgrade it when allowed, else say how."""
    check_connection(engine)
    if current_revision(engine) == SCHEMA_HEAD:
        return
    if not auto_upgrade:
        raise ServiceUnavailableError(
            f"database {engine.url.render_as_string(hide_password=True)} is not at the current schema; "
            "run `difftpt-ops db upgrade` first"
        )
    upgrade(engine)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = sessionmaker(engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
