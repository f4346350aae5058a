"""How shards get executed: who runs them (a worker's identity and liveness), dispatching them to
workers through a broker, re-queueing stale ones, and the embedded in-process executor.

Without a broker (`broker_url` unset), `submit` and `resume` run a run's shards here, one after the
other, through the same `execute_shard` the Celery workers call; a progress sink sees every sample.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from difftpt_ops.config import Settings
from difftpt_ops.core.clock import as_utc, utcnow
from difftpt_ops.core.errors import InputError, ServiceUnavailableError
from difftpt_ops.core.status import TERMINAL_RUN_STATES, TERMINAL_SHARD_STATES, RunState, ShardState
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import GeneratedImage, Prediction, Run, Shard
from difftpt_ops.db.tables import SampleError as SampleErrorRow
from difftpt_ops.services.tuning import QUEUE_OF_KIND

log = logging.getLogger(__name__)
_TERMINAL_SHARD = [state.value for state in TERMINAL_SHARD_STATES]




@dataclass(frozen=True)
class WorkerIdentity:
    """Who runs a shard: a Celery worker (its hostname) or the embedded executor, and its GPU."""

    name: str
    gpu: str | None = None
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    @property
    def label(self) -> str:
        """Stored on shards and predictions; host and pid let a resume on this host spot a dead worker."""
        return f"{self.name} ({self.host}:{self.pid})"


_LABEL = re.compile(r"^(?P<name>.*) \((?P<host>[^():]*):(?P<pid>\d+)\)$")


def worker_name(label: str | None) -> str | None:
    """The worker name of a stored label, without host and pid."""
    match = _LABEL.match(label or "")
    return match["name"] if match else label


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child not yet reaped by its parent still answers kill(0): a zombie
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in {"Z", "X"}
    except (OSError, IndexError):
        return False


def worker_is_gone(label: str | None) -> bool:
    """True when `label` names a process on this host that no longer runs (killed, crashed).

    Assumes host names are unique among the machines sharing a database (true for real hosts and
    for containers with their default host names).
    """
    match = _LABEL.match(label or "")
    if match is None or match["host"] != socket.gethostname():
        return False
    return _process_gone(int(match["pid"]))


def is_reclaimable(heartbeat_at: datetime | None, worker: str | None, *, now: datetime,
                   stale_after_s: float) -> bool:
    """A running shard may be taken over when its heartbeat is stale or its worker is known dead."""
    if heartbeat_at is None or (now - as_utc(heartbeat_at)).total_seconds() > stale_after_s:
        return True
    return worker_is_gone(worker)


def active_workers(running: Sequence[Any], *, now: datetime, stale_after_s: float) -> list[dict[str, Any]]:
    """Worker, GPU and shard of the running shard rows whose worker is alive (fresh heartbeat, not gone)."""
    return [{"worker": worker_name(row.worker), "gpu": row.gpu, "shard": row.index} for row in running
            if not is_reclaimable(row.heartbeat_at, row.worker, now=now, stale_after_s=stale_after_s)]


def recent_throughput(session: Session, run: Run, now: datetime, *, window_s: float) -> float | None:
    """Samples per second of a run over the last `window_s` seconds, from its result rows' timestamps
    (generate runs: generated images of its config / images per sample)."""
    if run.started_at is None:
        return None
    since = max(now - timedelta(seconds=window_s), as_utc(run.started_at))
    span = max((now - since).total_seconds(), 1.0)
    count = session.scalar(select(func.count()).where(
        SampleErrorRow.run_id == run.id, SampleErrorRow.created_at >= since)) or 0
    if run.kind == "generate":
        images = session.scalar(select(func.count()).where(
            GeneratedImage.generation_config_id == run.generation_config_id, GeneratedImage.created_at >= since)) or 0
        count += images / max(int(run.spec["generation"].get("per_sample", 1)), 1)
    else:
        count += session.scalar(select(func.count()).where(
            Prediction.run_id == run.id, Prediction.created_at >= since)) or 0
    return count / span


class Lease:
    """Ownership of one claimed shard: `token` guards every write; `lost` is set when a heartbeat finds
    the shard no longer ours (cancelled, or re-queued as stale)."""

    def __init__(self, engine: Engine, shard_id: int, token: int, interval_s: float) -> None:
        self.engine, self.shard_id, self.token = engine, shard_id, token
        self.interval_s = max(interval_s, 0.05)
        self.due = time.monotonic() + self.interval_s
        self.lost = threading.Event()


_BEAT = (update(Shard.__table__)
         .where(Shard.__table__.c.id == bindparam("b_id"), Shard.__table__.c.attempts == bindparam("b_token"),
                Shard.__table__.c.state == ShardState.RUNNING.value)
         .values(heartbeat_at=bindparam("b_now")))


class Heartbeats:
    """One daemon thread per process heartbeats every shard the process holds (none per shard: cheap)."""

    def __init__(self) -> None:
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, lease: Lease) -> None:
        with self._lock:
            self._leases[id(lease)] = lease
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="shard-heartbeats", daemon=True)
                self._thread.start()
        self._wake.set()

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(id(lease), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                leases = list(self._leases.values())
            now = time.monotonic()
            for lease in leases:
                if lease.due <= now:
                    lease.due = now + lease.interval_s
                    self._beat(lease)
            wait = min((lease.due for lease in leases), default=now + 60.0) - time.monotonic()
            self._wake.wait(max(wait, 0.01))
            self._wake.clear()

    @staticmethod
    def _beat(lease: Lease) -> None:
        try:
            with lease.engine.begin() as connection:
                params = {"b_id": lease.shard_id, "b_token": lease.token, "b_now": utcnow()}
                if connection.execute(_BEAT, params).rowcount != 1:
                    lease.lost.set()
        except SQLAlchemyError as exc:  # the next beat or the next batch tells whether this persists
            log.warning("heartbeat of shard %s failed: %s", lease.shard_id, exc)


HEARTBEATS = Heartbeats()


@dataclass(frozen=True)
class ShardTicket:
    """One message to send: run shard `shard_id` on `queue`, after `countdown` seconds."""

    shard_id: int
    queue: str
    countdown: float = 0.0


class Dispatcher(Protocol):
    """Sends shards to workers (workers/tasks.py implements it with Celery)."""

    def check(self) -> None:
        """Raise ServiceUnavailableError quickly when the broker cannot be reached."""

    def send(self, tickets: Sequence[ShardTicket]) -> None:
        """Enqueue the tickets; raise ServiceUnavailableError when the broker is gone."""


def queue_open_shards(engine: Engine, settings: Settings, run_id: int, kind: str, *,
                      include_queued: bool) -> list[ShardTicket]:
    """Mark the run's pending and reclaimable shards queued; return the tickets to send after the commit."""
    from difftpt_ops.services.waiting import hold_unready

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


def send_tickets(dispatcher: Dispatcher, tickets: list[ShardTicket], run_id: int) -> None:
    try:
        dispatcher.send(tickets)
    except ServiceUnavailableError as exc:
        raise ServiceUnavailableError(f"{exc}; run {run_id} is planned: `difftpt-ops resume {run_id}` "
                                      "enqueues it once the broker is back") from exc


def requeue_stale_shards(engine: Engine, settings: Settings, dispatcher: Dispatcher) -> int:
    """The workers' periodic check: re-queue running shards whose worker stopped heartbeating or is gone.

    A shard that lost its worker `shard_max_attempts` times (it may be what kills the worker) fails.
    A running run whose shards are all terminal (its last worker died before finalizing it) is finalized.
    Returns the number of shards re-queued.
    """
    from difftpt_ops.services.shards import finalize_run_if_complete
    from difftpt_ops.services.waiting import release_ready

    now, tickets = utcnow(), []
    with session_scope(engine) as session:
        rows = session.execute(
            select(Shard.id, Shard.run_id, Shard.attempts, Shard.heartbeat_at, Shard.worker, Run.kind)
            .join(Run, Run.id == Shard.run_id)
            .where(Run.state == RunState.RUNNING, Shard.state == ShardState.RUNNING)).all()
        for row in rows:
            if not is_reclaimable(row.heartbeat_at, row.worker, now=now, stale_after_s=settings.stale_after_s):
                continue
            if row.attempts >= settings.shard_max_attempts:
                session.execute(update(Shard).where(
                    Shard.id == row.id, Shard.state == ShardState.RUNNING, Shard.attempts == row.attempts,
                ).values(state=ShardState.FAILED, finished_at=now,
                         error=f"worker {row.worker} stopped heartbeating; {row.attempts} attempts used"))
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
    time first seen missing) is the caller's memory between checks. A duplicate message is harmless: a shard
    is claimed once. Returns the number of shards sent again.
    """
    inspect = getattr(dispatcher, "enqueued_shard_ids", None)
    if inspect is None:
        return 0
    with session_scope(engine) as session:  # the database first: a shard sent meanwhile is in the broker next
        queued = dict(session.execute(
            select(Shard.id, Run.kind).join(Run, Run.id == Shard.run_id)
            .where(Shard.state == ShardState.QUEUED, Run.state.in_([RunState.PENDING, RunState.RUNNING]))).all())
    enqueued = inspect()
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
    if due:
        dispatcher.send(due)
        for ticket in due:
            missing_since.pop(ticket.shard_id, None)
    return len(due)


class ProgressSink(Protocol):
    """What the embedded executor reports to (the CLI draws a progress bar from it)."""

    def start(self, run_id: int, total: int, completed: int) -> None: ...

    def advance(self, done: int, failed: int) -> None: ...


def embedded_identity(device: str | None) -> WorkerIdentity:
    gpu = device if device and device.startswith("cuda") else None
    return WorkerIdentity(name=f"embedded@{socket.gethostname()}", gpu=gpu)


def _open_shards(engine: Engine, run_id: int) -> tuple[list[int], int, int]:
    """Ids of the run's non-terminal shards in order, and the samples the run has and has finished."""
    terminal = [state.value for state in TERMINAL_SHARD_STATES]
    with session_scope(engine) as session:
        ids = list(session.scalars(select(Shard.id).where(Shard.run_id == run_id, Shard.state.not_in(terminal))
                                   .order_by(Shard.index)))
        total, finished = session.execute(
            select(func.coalesce(func.sum(Shard.stop - Shard.start), 0),
                   func.coalesce(func.sum(Shard.samples_done + Shard.samples_failed), 0))
            .where(Shard.run_id == run_id)).one()
    return ids, int(total), int(finished)


def run_embedded(engine: Engine, settings: Settings, run_id: int, *, device: str | None = None,
                 progress: ProgressSink | None = None) -> RunState | None:
    """Run the open shards of a run in this process; failed shards are retried after their backoff.

    Returns the run's final state, or None when it is not finished (another process holds a shard,
    or a shutdown stopped it). Ctrl-C (KeyboardInterrupt) propagates; `resume` finishes the run.
    """
    from difftpt_ops.services.shards import Outcome, execute_shard, finalize_run_if_complete

    identity = embedded_identity(device)
    shard_ids, total, finished = _open_shards(engine, run_id)
    if progress is not None:
        progress.start(run_id, total, finished)
    ready, waiting = deque(shard_ids), []  # waiting: a heap of (due time, shard id) for retries
    while ready or waiting:
        if not ready:
            due, shard_id = heapq.heappop(waiting)
            time.sleep(max(0.0, due - time.monotonic()))
            ready.append(shard_id)
        shard_id = ready.popleft()
        outcome = execute_shard(engine, settings, shard_id, identity=identity, device=device,
                                progress=progress.advance if progress is not None else None)
        if isinstance(outcome.error, (InputError, ServiceUnavailableError)):
            # A setup problem (model weights unreachable, a bad spec) fails every shard the same way:
            # say so now instead of retrying with backoff. The shard is stored; `resume` continues.
            raise outcome.error
        if outcome.outcome == Outcome.RETRY:
            heapq.heappush(waiting, (time.monotonic() + (outcome.retry_in_s or 0.0), shard_id))
        elif outcome.outcome == Outcome.INTERRUPTED:
            return None
    finalize_run_if_complete(engine, settings, run_id)
    return _terminal_state(engine, run_id)


def _terminal_state(engine: Engine, run_id: int) -> RunState | None:
    with session_scope(engine) as session:
        state = RunState(session.scalar(select(Run.state).where(Run.id == run_id)))
    return state if state in TERMINAL_RUN_STATES else None
