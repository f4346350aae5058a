"""What one delivery of a shard came to (`ShardOutcome`), the tickets it leaves to send (`ShardTicket`), the
retry backoff, and the process-wide stop flag a worker's warm shutdown sets; shared by episodic shards
(`shards`) and online chains (`online`), and the bottom of `running` with `leases` and `finalize`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import StrEnum

RETRY_BACKOFF_S = 10.0  # first retry of a failed shard after this, doubling per attempt
RETRY_BACKOFF_MAX_S = 600.0

_stop_requested = threading.Event()


def request_stop() -> None:
    """Ask running shards to stop after their current sample (a worker's warm shutdown)."""
    _stop_requested.set()


def stop_requested() -> bool:
    """True once a shutdown asked running shards to stop."""
    return _stop_requested.is_set()


@dataclass(frozen=True)
class ShardTicket:
    """One message to send: run shard `shard_id` on `queue`, after `countdown` seconds."""

    shard_id: int
    queue: str
    countdown: float = 0.0


class Outcome(StrEnum):
    DONE = "done"  # every sample has a result or an error row
    FAILED = "failed"  # failed as a whole, attempts used up (or a non-retryable error)
    RETRY = "retry"  # failed as a whole; send it again after retry_in_s
    INTERRUPTED = "interrupted"  # stopped by a shutdown; its finished samples are stored, send it again
    SKIPPED = "skipped"  # not claimable: done, running elsewhere, or cancelled (a duplicate delivery)
    LOST = "lost"  # ownership lost while running (cancelled or re-queued as stale)
    WAITING = "waiting"  # its inputs are not ready (generated images): parked until they are


@dataclass(frozen=True)
class ShardOutcome:
    """What happened to one delivery of a shard, and what the caller should do next."""

    shard_id: int
    outcome: Outcome
    queue: str | None = None
    retry_in_s: float | None = None
    processed: int = 0
    error: Exception | None = None  # why it failed as a whole (FAILED / RETRY)
    # Shards this one made claimable (tune shards that waited for this generation shard's images):
    # the caller sends them, after this shard's commit.
    follow_up: tuple[ShardTicket, ...] = ()


def retry_delay_s(attempt: int) -> float:
    """Backoff before retrying a shard that failed on attempt `attempt` (1-based)."""
    return min(RETRY_BACKOFF_S * 2 ** max(attempt - 1, 0), RETRY_BACKOFF_MAX_S)
