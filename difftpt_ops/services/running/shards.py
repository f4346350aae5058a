"""Executing one shard: claim it, skip its finished samples, process the rest, write results in batches.

Exactly-once rules:

- A shard is claimed by a conditional UPDATE (on its state, and on its attempt count for a takeover),
  so of two deliveries of the same shard only one proceeds; a late delivery of a finished shard is a no-op.
- The attempt count after the claim is the owner's token. Every later write (a batch of results, a
  heartbeat, the final state) is one transaction whose shard UPDATE matches that token: a worker that
  lost its shard (cancelled, or re-queued as stale) rolls its batch back instead of writing.
- Result rows have unique keys and are inserted with ON CONFLICT DO NOTHING, and a resumed shard
  first reads which samples already have results, so nothing finished is redone or duplicated.

The hot path uses prebuilt Core statements and one transaction per batch: the method `noop` measures
this bookkeeping alone (bench/system_overhead.py).
"""


from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from difftpt_ops.config import Settings
from difftpt_ops.core.clock import utcnow
from difftpt_ops.core.errors import InputError, NotReadyError, SampleError, TransientError
from difftpt_ops.core.status import SampleStatus, ShardState
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Run, Sample, Shard
from difftpt_ops.db.tables import SampleError as SampleErrorRow
from difftpt_ops.db.writes import insert_many_ignore
from difftpt_ops.services.reading.reporting import report_progress_throttled
from difftpt_ops.services.running import online
from difftpt_ops.services.running.contexts import RunContext, open_run_context
from difftpt_ops.services.running.finalize import finalize_run_if_complete
from difftpt_ops.services.running.leases import (
    HEARTBEATS,
    OWNED,
    Lease,
    WorkerIdentity,
    claim_row,
    claim_statements,
    release_shard,
)
from difftpt_ops.services.running.outcomes import Outcome, ShardOutcome, ShardTicket, retry_delay_s, stop_requested
from difftpt_ops.services.running.processors import QUEUE_OF_KIND, record_provenance
from difftpt_ops.services.running.views_ahead import views_ahead_for
from difftpt_ops.services.running.waiting import release_ready

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 2.0  # a crash loses at most this much finished work; fast methods commit rarely
FLUSH_MAX_SAMPLES = 512  # bounds a batch's memory and transaction size

ProgressFn = Callable[[int, int], None]  # (samples done, samples failed) since the last call

_S = Shard.__table__.c
_CLAIM = claim_statements((_S.run_id, _S.start, _S.stop, _S.attempts, _S.samples_done, _S.samples_failed))
_COUNTERS = {"samples_done": bindparam("b_done"), "samples_failed": bindparam("b_failed"),
             "heartbeat_at": bindparam("b_now"), "seconds": _S.seconds + bindparam("b_seconds")}
_FLUSH = update(Shard.__table__).where(OWNED).values(**_COUNTERS)
_FLUSH_DONE = update(Shard.__table__).where(OWNED).values(
    **_COUNTERS, state=ShardState.DONE.value, finished_at=bindparam("b_now"), error=None)
_C = Sample.__table__.c
_SAMPLES = (select(_C.id, _C.index, _C.relpath, _C.label, _C.content_hash, _C.status, _C.error)
            .where(_C.dataset_version_id == bindparam("b_version"), _C.index >= bindparam("b_start"),
                   _C.index < bindparam("b_stop")).order_by(_C.index))
_ERRORED = select(SampleErrorRow.__table__.c.sample_id).where(
    SampleErrorRow.__table__.c.run_id == bindparam("b_run"),
    SampleErrorRow.__table__.c.sample_id.in_(bindparam("b_ids", expanding=True)))


@dataclass(frozen=True)
class Claim:
    """A shard this process now owns; `token` (the attempt count) guards every later write."""

    shard_id: int
    run_id: int
    token: int
    start: int
    stop: int
    counted: int = 0  # samples_done + samples_failed when claimed: 0 means no result row can exist yet
    worker: str | None = None  # the claimer's label, stored on the shard: part of what OWNED matches

    def params(self, **extra: Any) -> dict[str, Any]:
        return {"b_id": self.shard_id, "b_token": self.token, "b_worker": self.worker, **extra}


def claim_shard(engine: Engine, settings: Settings, shard_id: int, identity: WorkerIdentity) -> Claim | None:
    """Take ownership of a shard if it is pending, queued, or running on a dead or silent worker."""
    row = claim_row(engine, settings, shard_id, identity, _CLAIM)
    if row is None:
        return None
    return Claim(shard_id, row.run_id, row.attempts, row.start, row.stop, row.samples_done + row.samples_failed,
                 worker=identity.label)


@dataclass
class _Batch:
    """Results not yet written, and the shard's running totals (absolute, so counters self-heal)."""

    done_total: int
    failed_total: int
    results: list[Any] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    since: float = field(default_factory=time.monotonic)

    def due(self) -> bool:
        pending = len(self.results) + len(self.errors)
        return pending >= FLUSH_MAX_SAMPLES or (pending > 0 and time.monotonic() - self.since >= FLUSH_INTERVAL_S)

    def clear(self) -> None:
        self.results.clear()
        self.errors.clear()
        self.seconds = 0.0
        self.since = time.monotonic()


def _flush(engine: Engine, settings: Settings, claim: Claim, context: RunContext, batch: _Batch, *,
           final: bool) -> bool:
    """Write a batch and the shard's counters in one transaction; False if the shard is no longer ours."""
    params = claim.params(b_done=batch.done_total, b_failed=batch.failed_total, b_now=utcnow(),
                          b_seconds=batch.seconds)
    with engine.connect() as connection, connection.begin() as transaction:
        context.processor.write(connection, batch.results)
        insert_many_ignore(connection, SampleErrorRow, batch.errors)
        if connection.execute(_FLUSH_DONE if final else _FLUSH, params).rowcount != 1:
            transaction.rollback()
            return False
    batch.clear()
    report_progress_throttled(engine, settings, claim.run_id)
    return True


def _load_samples(engine: Engine, context: RunContext, claim: Claim) -> tuple[list[Any], set[int], int]:
    """The shard's sample rows, the ids that already have a result, and how many of those are errors."""
    params = {"b_version": context.dataset_version_id, "b_start": claim.start, "b_stop": claim.stop}
    with engine.connect() as connection:
        rows = connection.execute(_SAMPLES, params).all()
        if not rows or (claim.counted == 0 and context.counts_results):
            return rows, set(), 0  # a tuning shard with zero counters has no result rows yet
        ids = [row.id for row in rows]
        errored = set(connection.execute(_ERRORED, {"b_run": claim.run_id, "b_ids": ids}).scalars())
        finished = context.processor.finished_ids(connection, rows)
    return rows, finished | errored, len(errored)


def _error_row(run_id: int, sample: Any, message: str) -> dict[str, Any]:
    return {"run_id": run_id, "sample_id": sample.id, "sample_index": sample.index, "error": message[:4000],
            "created_at": utcnow()}


def _process_samples(engine: Engine, settings: Settings, claim: Claim, context: RunContext, lease: Lease,
                     progress: ProgressFn | None) -> ShardOutcome:
    # 1. Load the shard's samples and skip those that already have a result or an error row.
    rows, finished, errored = _load_samples(engine, context, claim)
    batch = _Batch(done_total=len(finished) - errored, failed_total=errored)
    todo = [row for row in rows if row.id not in finished]
    processed = 0
    ahead = views_ahead_for(context.processor, todo)  # the next sample's views built during this one's run
    try:
        for position, sample in enumerate(todo):
            # 2. Stop between samples when asked to, or when the shard was cancelled or taken over.
            if stop_requested() or lease.lost.is_set():
                break
            # 3. Samples that failed at registration are recorded, never fed to a model.
            started = time.perf_counter()
            try:
                if sample.status == SampleStatus.FAILED:
                    raise SampleError(sample.error or "sample failed at registration")
                batch.results.append(ahead.process(position) if ahead is not None
                                     else context.processor.process(sample))
                batch.done_total += 1
                ok = 1
            except SampleError as exc:
                batch.errors.append(_error_row(claim.run_id, sample, str(exc)))
                batch.failed_total += 1
                ok = 0
            batch.seconds += time.perf_counter() - started
            processed += 1
            if progress is not None:
                progress(ok, 1 - ok)
            # 4. Write a batch every few seconds, together with the shard's counters.
            if batch.due() and not _flush(engine, settings, claim, context, batch, final=False):
                return ShardOutcome(claim.shard_id, Outcome.LOST, context.queue, processed=processed)
    except KeyboardInterrupt:
        _flush_quietly(engine, settings, claim, context, batch)
        raise
    finally:
        if ahead is not None:
            ahead.close()
    # 5. The last batch marks the shard done, unless we stopped early.
    complete = processed == len(todo)
    if not _flush(engine, settings, claim, context, batch, final=complete):
        return ShardOutcome(claim.shard_id, Outcome.LOST, context.queue, processed=processed)
    if complete:  # (a heartbeat racing the final flush may have set `lost`: the flush decides)
        return ShardOutcome(claim.shard_id, Outcome.DONE, context.queue, processed=processed)
    if lease.lost.is_set():
        return ShardOutcome(claim.shard_id, Outcome.LOST, context.queue, processed=processed)
    release_shard(engine, claim, ShardState.QUEUED)
    return ShardOutcome(claim.shard_id, Outcome.INTERRUPTED, context.queue, processed=processed)


def _flush_quietly(engine: Engine, settings: Settings, claim: Claim, context: RunContext, batch: _Batch) -> None:
    """Keep finished samples on Ctrl-C; a second interrupt or a database error just skips it."""
    try:
        _flush(engine, settings, claim, context, batch, final=False)
    except (SQLAlchemyError, KeyboardInterrupt):
        log.warning("could not store the last batch of shard %s; resume redoes it", claim.shard_id)


def _record_failure(engine: Engine, settings: Settings, claim: Claim, queue: str | None,
                    exc: Exception) -> ShardOutcome:
    """Store the traceback; queue the shard for a retry, or fail it once its attempts are used up."""
    retry = not isinstance(exc, InputError) and claim.token < settings.shard_max_attempts
    values: dict[str, Any] = {"state": (ShardState.QUEUED if retry else ShardState.FAILED).value,
                              "error": "".join(traceback.format_exception(exc))[-8000:]}
    if not retry:
        values["finished_at"] = utcnow()
    try:
        with engine.begin() as connection:
            connection.execute(update(Shard.__table__).where(OWNED).values(**values), claim.params())
    except SQLAlchemyError as db_exc:
        raise TransientError(f"shard {claim.shard_id}: cannot record its failure ({db_exc})") from exc
    log.warning("shard %s attempt %s failed: %s", claim.shard_id, claim.token, exc)
    if retry:
        return ShardOutcome(claim.shard_id, Outcome.RETRY, queue, retry_in_s=retry_delay_s(claim.token), error=exc)
    return ShardOutcome(claim.shard_id, Outcome.FAILED, queue, error=exc)


def execute_shard(engine: Engine, settings: Settings, shard_id: int, *, identity: WorkerIdentity,
                  device: str | None = None, progress: ProgressFn | None = None) -> ShardOutcome:
    """Run one shard to completion (or until stopped), writing its results in batches.

    Args:
        shard_id: the shard to run; a shard that is not claimable is skipped (a duplicate delivery).
        identity: who runs it, stored on the shard and its predictions.
        device: torch device for the models; None uses the settings' device.
        progress: called after each sample with (done, failed) increments.

    Raises:
        TransientError: the database failed (before the claim, while running, or while finalizing): the
            caller delivers the shard again later. Never a raw SQLAlchemyError, which a Celery worker would
            take as the task's final failure and acknowledge, losing the shard's message.
    """
    try:
        return _execute_shard(engine, settings, shard_id, identity=identity, device=device, progress=progress)
    except SQLAlchemyError as exc:
        raise TransientError(f"shard {shard_id}: database error ({exc.__class__.__name__}: {exc})") from exc


def _execute_shard(engine: Engine, settings: Settings, shard_id: int, *, identity: WorkerIdentity,
                   device: str | None, progress: ProgressFn | None) -> ShardOutcome:
    if online.is_chained_shard(engine, shard_id):  # online runs: one link of an ordered chain at a time
        return online.execute_online_shard(engine, settings, shard_id, identity=identity, device=device,
                                           progress=progress)
    claim = claim_shard(engine, settings, shard_id, identity)
    if claim is None:
        return ShardOutcome(shard_id, Outcome.SKIPPED)
    # Known before the run's context opens: a shard whose setup fails (a model that does not load) must still
    # be sent again to its queue, or its retry is lost and waits for the lost-message check.
    queue = _queue_of_run(engine, claim.run_id)
    lease = Lease(engine, claim.shard_id, claim.token, settings.heartbeat_interval_s, worker=claim.worker)
    HEARTBEATS.hold(lease)
    try:
        context = open_run_context(engine, settings, claim.run_id, device=device, worker=identity.label)
        queue = context.queue
        record_provenance(engine, claim, context)
        outcome = _process_samples(engine, settings, claim, context, lease, progress)
    except NotReadyError as exc:
        outcome = _park(engine, claim, queue, exc)
    except KeyboardInterrupt:
        release_shard(engine, claim, ShardState.PENDING)
        raise
    except TransientError:
        raise
    except SQLAlchemyError as exc:  # the database went away: let the caller retry the delivery later
        raise TransientError(f"shard {shard_id}: database error ({exc.__class__.__name__}: {exc})") from exc
    except Exception as exc:  # noqa: BLE001 - a shard failing as a whole is recorded, not raised
        outcome = _record_failure(engine, settings, claim, queue, exc)
    finally:
        HEARTBEATS.release(lease)
    if outcome.outcome in (Outcome.DONE, Outcome.FAILED):
        finalize_run_if_complete(engine, settings, claim.run_id)
    if outcome.outcome == Outcome.DONE and queue == "generate":
        outcome = _wake_dependents(engine, claim, outcome)
    return outcome


def _queue_of_run(engine: Engine, run_id: int) -> str:
    """The broker queue a run's shards go to (by its kind)."""
    with engine.connect() as connection:
        kind = connection.scalar(select(Run.kind).where(Run.id == run_id))
    return QUEUE_OF_KIND[kind]


def _park(engine: Engine, claim: Claim, queue: str | None, exc: NotReadyError) -> ShardOutcome:
    """Give the shard back as waiting (no attempt spent): its inputs are not ready yet."""
    with engine.begin() as connection:
        connection.execute(update(Shard.__table__).where(OWNED).values(
            state=ShardState.WAITING.value, attempts=claim.token - 1, worker=None, gpu=None, heartbeat_at=None,
            waiting_reason=str(exc)), claim.params())
    log.info("shard %s waits: %s", claim.shard_id, exc)
    return ShardOutcome(claim.shard_id, Outcome.WAITING, queue, error=exc)


def _wake_dependents(engine: Engine, claim: Claim, outcome: ShardOutcome) -> ShardOutcome:
    """After a generation shard: the waiting tune shards whose images are now complete become queued."""
    with session_scope(engine) as session:
        config_id = session.scalar(select(Run.generation_config_id).where(Run.id == claim.run_id))
    if config_id is None:
        return outcome
    tickets = tuple(ShardTicket(shard_id, queue) for shard_id, queue in release_ready(engine, config_id=config_id))
    return dataclasses.replace(outcome, follow_up=tickets) if tickets else outcome
