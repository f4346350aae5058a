"""The one clock: aware UTC datetimes everywhere (the database stores UTC)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite returns naive datetimes (stored in UTC); PostgreSQL returns aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
