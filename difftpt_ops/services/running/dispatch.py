"""Sending shards to workers: tickets, queueing a run's open shards, and the workers' periodic checks
that re-queue shards whose worker went silent or whose broker message was lost.

`workers/tasks.py` implements the `Dispatcher` with Celery. Without a broker, `embedded` runs the
shards in-process instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from sqlalchemy import or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from difftpt_ops.config import Settings
from difftpt_ops.core.clock import utcnow
from difftpt_ops.core.errors import ServiceUnavailableError
from difftpt_ops.core.status import TERMINAL_SHARD_STATES, RunState, ShardState
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Run, Shard
from difftpt_ops.services.running import online
from difftpt_ops.services.running.finalize import finalize_run_if_complete
from difftpt_ops.services.running.leases import is_reclaimable, reclaim_reason
from difftpt_ops.services.running.outcomes import ShardTicket
from difftpt_ops.services.running.processors import QUEUE_OF_KIND
from difftpt_ops.services.running.waiting import hold_unready, release_ready

log = logging.getLogger(__name__)
_TERMINAL_SHARD = [state.value for state in TERMINAL_SHARD_STATES]


class Dispatcher(Protocol):
    """Sends shards to workers (workers/tasks.py implements it with Celery)."""

    def check(self) -> None:
        """Raise ServiceUnavailableError quickly when the broker cannot be reached."""

    def send(self, tickets: Sequence[ShardTicket]) -> None:
        """Enqueue the tickets; raise ServiceUnavailableError when the broker is gone."""


def queue_open_shards(engine: Engine, settings: Settings, run_id: int, kind: str, *,
                      include_queued: bool) -> list[ShardTicket]:
    """Mark the run's pending and reclaimable shards queued; return the tickets to send after the commit."""
    now, queue = utcnow(), QUEUE_OF_KIND[kind]
    with session_scope(engine) as session:
        ids = list(session.scalars(update(Shard).where(
            Shard.run_id == run_id, Shard.state.in_([ShardState.PENDING, ShardState.WAITING]))
            .values(state=ShardState.QUEUED, waiting_reason=None).returning(Shard.id)))
        # Shards whose samples lack their generated images wait instead (waiting.py).
        ids = hold_unready(session, session.get(Run, run_id), ids)
        if include_queued:
            ids += session.scalars(select(Shard.id).where(Shard.run_id == run_id, Shard.state == ShardState.QUEUED,
                                                          Shard.id.not_in(ids)))
        running = session.execute(select(Shard.id, Shard.attempts, Shard.heartbeat_at, Shard.worker).where(
            Shard.run_id == run_id, Shard.state == ShardState.RUNNING)).all()
        for row in running:
            if is_reclaimable(row.heartbeat_at, row.worker, now=now, stale_after_s=settings.stale_after_s):
                ids += _requeue_running(session, row.id, row.attempts)
    return [ShardTicket(shard_id, queue) for shard_id in sorted(ids)]


def _requeue_running(session: Session, shard_id: int, attempts: int) -> list[int]:
    moved = session.execute(update(Shard).where(
        Shard.id == shard_id, Shard.state == ShardState.RUNNING, Shard.attempts == attempts,
    ).values(state=ShardState.QUEUED, worker=None, gpu=None, heartbeat_at=None)).rowcount
    return [shard_id] if moved == 1 else []


def send_tickets(engine: Engine, dispatcher: Dispatcher, tickets: list[ShardTicket], run_id: int) -> None:
    """Send the tickets of a run's shards, marked queued by the caller. When the broker is gone they go back
    to pending: no message may exist for them, and `status` then shows the run as stopped until `resume`."""
    try:
        dispatcher.send(tickets)
    except ServiceUnavailableError as exc:
        make_pending_again(engine, [ticket.shard_id for ticket in tickets])
        raise ServiceUnavailableError(f"{exc}; run {run_id} is planned: `difftpt-ops resume {run_id}` "
                                      "enqueues it once the broker is back") from exc


def make_pending_again(engine: Engine, shard_ids: list[int]) -> None:
    """Queued shards that no message and no process will deliver (a failed send, an embedded executor that
    stopped during a retry's backoff) become pending, so `status` shows their run as stopped. Best effort:
    the error being raised matters more, and `resume` takes queued shards as well."""
    if not shard_ids:
        return
    try:
        with engine.begin() as connection:
            connection.execute(update(Shard.__table__).where(
                Shard.__table__.c.id.in_(shard_ids), Shard.__table__.c.state == ShardState.QUEUED.value)
                .values(state=ShardState.PENDING.value))
    except SQLAlchemyError:
        log.warning("could not mark shards %s pending again", shard_ids)


def requeue_stale_shards(engine: Engine, settings: Settings, dispatcher: Dispatcher) -> int:
    """The workers' periodic check: re-queue running shards whose worker stopped heartbeating or is gone.

    A shard that lost its worker `shard_max_attempts` times (it may be what kills the worker) fails.
    A running run whose shards are all terminal (its last worker died before finalizing it) is finalized.
    Returns the number of shards re-queued.
    """
    now, tickets = utcnow(), []
    with session_scope(engine) as session:
        rows = session.execute(
            select(Shard.id, Shard.run_id, Shard.index, Shard.attempts, Shard.heartbeat_at, Shard.worker, Run.kind)
            .join(Run, Run.id == Shard.run_id)
            .where(Run.state == RunState.RUNNING, Shard.state == ShardState.RUNNING)).all()
        for row in rows:
            reason = reclaim_reason(row.heartbeat_at, row.worker, now=now, stale_after_s=settings.stale_after_s)
            if reason is None:
                continue
            if row.attempts >= settings.shard_max_attempts:
                failed = session.execute(update(Shard).where(
                    Shard.id == row.id, Shard.state == ShardState.RUNNING, Shard.attempts == row.attempts,
                ).values(state=ShardState.FAILED, finished_at=now,
                         error=f"worker {row.worker} {reason}; {row.attempts} attempts used")).rowcount
                if failed == 1 and online.is_chained_shard(engine, row.id):  # the links after it cannot run
                    online.fail_rest_of_chain(session, row.run_id, row.index)
            else:
                tickets += [ShardTicket(i, QUEUE_OF_KIND[row.kind]) for i in
                            _requeue_running(session, row.id, row.attempts)]
        open_shard = select(Shard.id).where(Shard.run_id == Run.id, Shard.state.not_in(_TERMINAL_SHARD)).exists()
        settled = list(session.scalars(select(Run.id).where(Run.state == RunState.RUNNING, ~open_shard)))
    for run_id in settled:
        finalize_run_if_complete(engine, settings, run_id)
    # Waiting shards whose inputs completed (a missed wake-up after a generation shard) become queued.
    tickets += [ShardTicket(shard_id, queue) for shard_id, queue in release_ready(engine)]
    if tickets:
        dispatcher.send(tickets)
    return len(tickets)


@runtime_checkable
class BrokerInspector(Protocol):
    """A dispatcher that can list the shards its broker holds (Redis can; RabbitMQ keeps its queues on disk)."""

    def enqueued_shard_ids(self) -> set[int] | None:
        """Shard ids in a broker queue or delivered and not yet acknowledged; None when the broker cannot tell."""


def requeue_lost_messages(engine: Engine, settings: Settings, dispatcher: Dispatcher,
                          missing_since: dict[int, float]) -> int:
    """The workers' periodic check, second half: send again the queued shards whose message the broker lost.

    Redis without persistence forgets its queues on a restart, while the database still says `queued`: such a
    run would sit idle until someone typed `resume`. A shard queued in the database but in no broker queue
    (nor delivered, unacknowledged) for `lost_message_grace_s` is sent again. The grace period covers the
    moment between the commit that marks a shard queued and the send. `missing_since` (shard id -> monotonic
    time first seen missing) is the caller's memory between checks. The workers' checks share the work
    through the database: one of them sends each lost shard (`Shard.resent_at`). Returns the number of
    shards this check sent again.
    """
    if not isinstance(dispatcher, BrokerInspector):  # this broker cannot list what it holds
        return 0
    with session_scope(engine) as session:  # the database first: a shard sent meanwhile is in the broker next
        queued = dict(session.execute(
            select(Shard.id, Run.kind).join(Run, Run.id == Shard.run_id)
            .where(Shard.state == ShardState.QUEUED, Run.state.in_([RunState.PENDING, RunState.RUNNING]))).all())
    enqueued = dispatcher.enqueued_shard_ids()
    if enqueued is None:
        return 0
    now, due = time.monotonic(), []
    for shard_id in list(missing_since):
        if shard_id not in queued or shard_id in enqueued:
            del missing_since[shard_id]
    for shard_id, kind in queued.items():
        if shard_id in enqueued:
            continue
        if now - missing_since.setdefault(shard_id, now) >= settings.lost_message_grace_s:
            due.append(ShardTicket(shard_id, QUEUE_OF_KIND[kind]))
    due, claimed_at = _claim_resends(engine, due, grace_s=settings.lost_message_grace_s)
    if due:
        try:
            dispatcher.send(due)
        except ServiceUnavailableError:  # nothing went out: free the claims, or every check would wait a grace period
            _release_resends(engine, [ticket.shard_id for ticket in due], claimed_at)
            raise
    for ticket in due:
        missing_since.pop(ticket.shard_id, None)
    return len(due)


def _claim_resends(engine: Engine, tickets: list[ShardTicket], *,
                   grace_s: float) -> tuple[list[ShardTicket], datetime]:
    """The tickets this check may send, and the claim's time: every worker's check sees the same lost shards
    after a broker restart, and without a claim each would send one (a failing shard would then run its
    attempts back to back). A shard is claimed once per grace period, and only while it is still queued.
    (The hosts' clocks are assumed to agree within the grace period, as heartbeats assume it too.)"""
    now = utcnow()
    if not tickets:
        return [], now
    cutoff = now - timedelta(seconds=grace_s)
    claimed = []
    with engine.begin() as connection:
        for ticket in tickets:
            moved = connection.execute(update(Shard.__table__).where(
                Shard.__table__.c.id == ticket.shard_id, Shard.__table__.c.state == ShardState.QUEUED.value,
                or_(Shard.__table__.c.resent_at.is_(None), Shard.__table__.c.resent_at <= cutoff),
            ).values(resent_at=now)).rowcount
            if moved == 1:
                claimed.append(ticket)
    return claimed, now


def _release_resends(engine: Engine, shard_ids: list[int], claimed_at: datetime) -> None:
    try:
        with engine.begin() as connection:
            connection.execute(update(Shard.__table__).where(
                Shard.__table__.c.id.in_(shard_ids), Shard.__table__.c.resent_at == claimed_at).values(resent_at=None))
    except SQLAlchemyError:
        log.warning("could not release the re-send claims of shards %s", shard_ids)
