"""Who holds a shard, and for how long: a worker's identity and liveness, the lease a claim gives it,
the heartbeats that keep the lease, and giving a shard back.

A claimed shard's attempt count is its owner's token: every write the owner makes matches it, so a
worker whose shard was re-queued as stale (silent heartbeat, or its process gone) or cancelled writes
nothing more. `dispatch` re-queues such shards; `shards` and `online` claim them.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Row, Update, bindparam, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from difftpt_ops.config import Settings
from difftpt_ops.core import clock
from difftpt_ops.core.clock import as_utc, utcnow
from difftpt_ops.core.status import ShardState
from difftpt_ops.db.session import database_clock_offset
from difftpt_ops.db.tables import Shard

log = logging.getLogger(__name__)
_S = Shard.__table__.c
# The rows a shard's owner may write: its id, its token (attempt count when claimed), its worker label, still
# running. The label matters because `resume` gives cancelled and failed shards fresh attempts (0): the next
# claim then gets the token a cancelled worker still holds, and only the label tells them apart.
OWNED = ((_S.id == bindparam("b_id")) & (_S.attempts == bindparam("b_token")) & (_S.worker == bindparam("b_worker"))
         & (_S.state == ShardState.RUNNING.value))
_OPEN = [ShardState.PENDING.value, ShardState.QUEUED.value]
_CLAIM_VALUES = {"state": ShardState.RUNNING.value, "attempts": _S.attempts + 1, "worker": bindparam("b_worker"),
                 "gpu": bindparam("b_gpu"), "heartbeat_at": bindparam("b_now"), "started_at": bindparam("b_now"),
                 "finished_at": None}
_SHARD_ROW = select(_S.state, _S.attempts, _S.heartbeat_at, _S.worker).where(_S.id == bindparam("b_id"))


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


def stale_check_interval_s(stale_after_s: float) -> float:
    """How often each worker looks for stale shards: a quarter of the staleness limit, 1 to 60 s."""
    return min(max(stale_after_s / 4, 1.0), 60.0)


def awaiting_takeover(running: Sequence[Any], *, now: datetime, stale_after_s: float) -> int:
    """Of a run's running shard rows, those whose worker went silent or died recently enough that a live (or
    restarted) worker's next stale-shard check will re-queue them: a run with such a shard is not stopped yet.
    Past that, a shard still running means no live worker checked, so nothing will continue it but `resume`."""
    limit = stale_after_s + stale_check_interval_s(stale_after_s) + 5.0
    # A worker process known gone (killed, OOM) with a recent heartbeat counts too: `difftpt-ops worker` restarts
    # it within seconds and its first check re-queues the shard, so the run is not stopped until `limit`.
    ages = [(row, (now - as_utc(row.heartbeat_at)).total_seconds()) for row in running if row.heartbeat_at is not None]
    return sum(1 for row, age in ages if age <= limit and (stale_after_s < age or worker_is_gone(row.worker)))


def is_reclaimable(heartbeat_at: datetime | None, worker: str | None, *, now: datetime,
                   stale_after_s: float) -> bool:
    """A running shard may be taken over when its heartbeat is stale or its worker is known dead."""
    return reclaim_reason(heartbeat_at, worker, now=now, stale_after_s=stale_after_s) is not None


def reclaim_reason(heartbeat_at: datetime | None, worker: str | None, *, now: datetime,
                   stale_after_s: float) -> str | None:
    """Why a running shard may be taken over, in words for its error and the workers' log, or None when its
    worker is alive: "stopped heartbeating" (silent past `stale_after_s`: paused, hung, or on a lost host) or
    "exited" (its process on this host is gone: killed or crashed, seen before its heartbeat went stale)."""
    if heartbeat_at is None or (now - as_utc(heartbeat_at)).total_seconds() > stale_after_s:
        return "stopped heartbeating"
    return "exited" if worker_is_gone(worker) else None


def active_workers(running: Sequence[Any], *, now: datetime, stale_after_s: float) -> list[dict[str, Any]]:
    """Worker, GPU and shard of the running shard rows whose worker is alive (fresh heartbeat, not gone)."""
    return [{"worker": worker_name(row.worker), "gpu": row.gpu, "shard": row.index} for row in running
            if not is_reclaimable(row.heartbeat_at, row.worker, now=now, stale_after_s=stale_after_s)]


class Lease:
    """Ownership of one claimed shard: `token` guards every write; `lost` is set when a heartbeat finds
    the shard no longer ours (cancelled, or re-queued as stale)."""

    def __init__(self, engine: Engine, shard_id: int, token: int, interval_s: float, *, worker: str | None) -> None:
        self.engine, self.shard_id, self.token, self.worker = engine, shard_id, token, worker
        self.interval_s = max(interval_s, 0.05)
        self.due = time.monotonic() + self.interval_s
        self.lost = threading.Event()


_BEAT = update(Shard.__table__).where(OWNED).values(heartbeat_at=bindparam("b_now"))


CLOCK_RESYNC_S = 60.0  # how often a process holding shards measures the database clock again


class Heartbeats:
    """One daemon thread per process heartbeats every shard the process holds (none per shard: cheap), and
    keeps the process on the database's clock (`core.clock`): a host clock stepped by NTP after the process
    opened the database would otherwise date its heartbeats wrongly by that step."""

    def __init__(self) -> None:
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._clock_due = time.monotonic() + CLOCK_RESYNC_S

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
            if leases and self._clock_due <= now:
                self._clock_due = now + CLOCK_RESYNC_S
                resync_clock(leases[0].engine)
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
                params = {"b_id": lease.shard_id, "b_token": lease.token, "b_worker": lease.worker, "b_now": utcnow()}
                if connection.execute(_BEAT, params).rowcount != 1:
                    lease.lost.set()
        except SQLAlchemyError as exc:  # the next beat or the next batch tells whether this persists
            log.warning("heartbeat of shard %s failed: %s", lease.shard_id, exc)


HEARTBEATS = Heartbeats()


def resync_clock(engine: Engine) -> None:
    """Measure the database clock again and follow it. Best effort: a failure keeps the last offset."""
    try:
        clock.follow(database_clock_offset(engine))
    except SQLAlchemyError as exc:
        log.warning("could not read the database clock: %s", exc)


@dataclass(frozen=True)
class ClaimStatements:
    """The two conditional UPDATEs a claim runs, returning `columns` of the claimed shard."""

    open: Update  # an open (pending or queued) shard, when the gate allows
    takeover: Update  # a running shard whose attempt count is the one seen (its worker gone or silent)


def claim_statements(columns: Sequence[Any], *, gate: ColumnElement[bool] | None = None) -> ClaimStatements:
    """Claim statements returning `columns`; `gate` is an extra condition on opening a shard (an online
    run's chain: its predecessor is done)."""
    opening = [_S.id == bindparam("b_id"), _S.state.in_(_OPEN), *([gate] if gate is not None else [])]
    return ClaimStatements(
        open=update(Shard.__table__).where(*opening).values(**_CLAIM_VALUES).returning(*columns),
        takeover=(update(Shard.__table__).where(_S.id == bindparam("b_id"), _S.state == ShardState.RUNNING.value,
                                                _S.attempts == bindparam("b_seen"))
                  .values(**_CLAIM_VALUES).returning(*columns)))


def claim_row(engine: Engine, settings: Settings, shard_id: int, identity: WorkerIdentity,
          statements: ClaimStatements) -> Row[Any] | None:
    """Take ownership of a shard if it is open, or running on a dead or silent worker; None otherwise.

    Each UPDATE is conditional, so of two deliveries of one shard only one gets the row back; its
    `attempts` is the new owner's token.
    """
    now = utcnow()
    params = {"b_id": shard_id, "b_worker": identity.label, "b_gpu": identity.gpu, "b_now": now}
    with engine.begin() as connection:
        row = connection.execute(statements.open, params).one_or_none()
        if row is None:  # not open: perhaps running on a worker that is gone
            seen = connection.execute(_SHARD_ROW, {"b_id": shard_id}).one_or_none()
            if seen is None or seen.state != ShardState.RUNNING or not is_reclaimable(
                    seen.heartbeat_at, seen.worker, now=now, stale_after_s=settings.stale_after_s):
                return None
            row = connection.execute(statements.takeover, {**params, "b_seen": seen.attempts}).one_or_none()
    return row


class OwnedClaim(Protocol):
    """A claim on a shard (episodic or chained): its token and the parameters that match OWNED."""

    @property
    def shard_id(self) -> int: ...

    @property
    def token(self) -> int: ...

    def params(self, **extra: Any) -> dict[str, Any]: ...


def release_shard(engine: Engine, claim: OwnedClaim, state: ShardState) -> None:
    """Give a shard back (interrupt or shutdown) without spending an attempt."""
    with engine.begin() as connection:
        connection.execute(update(Shard.__table__).where(OWNED).values(
            state=state.value, attempts=claim.token - 1, worker=None, gpu=None, heartbeat_at=None), claim.params())
