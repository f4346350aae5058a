"""The one clock: aware UTC datetimes everywhere (the database stores UTC).

Heartbeats, stale shards and re-sent messages compare moments written by different hosts. A process that
shares a database server with other hosts therefore reads the server's clock: `follow` sets the offset
`services.workspace.open_database` measured (measured again every minute by a process holding shards, and at
every stale-shard check), and every `utcnow()` adds it. A host whose clock is minutes ahead would otherwise
see every other worker's heartbeat as stale and take its shards.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_offset = timedelta(0)


def utcnow() -> datetime:
    """Now, as an aware UTC datetime, on the clock this process follows (its own unless `follow` was called)."""
    return local_now() + _offset


def local_now() -> datetime:
    """This host's clock, as an aware UTC datetime."""
    return datetime.now(UTC)


def follow(offset: timedelta) -> None:
    """Read another clock from now on: the local clock plus `offset`."""
    global _offset
    _offset = offset


def offset() -> timedelta:
    """How far the followed clock is ahead of the local one."""
    return _offset


def as_utc(moment: datetime) -> datetime:
    """SQLite returns naive datetimes (stored in UTC); PostgreSQL returns aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
