"""The embedded executor: without a broker (`broker_url` unset), `submit` and `resume` run a run's
shards here, in this process, one after the other, through the same `execute_shard` the Celery workers
call; a progress sink sees every sample.
"""

from __future__ import annotations

import heapq
import logging
import socket
import time
from collections import deque
from typing import Protocol

from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import InputError, ServiceUnavailableError
from difftpt_ops.core.status import TERMINAL_RUN_STATES, TERMINAL_SHARD_STATES, RunState, ShardState
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Run, Shard
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.running.finalize import finalize_run_if_complete
from difftpt_ops.services.running.leases import WorkerIdentity
from difftpt_ops.services.running.outcomes import Outcome
from difftpt_ops.services.running.shards import execute_shard
from difftpt_ops.services.workspace import remove_stale_temporaries

log = logging.getLogger(__name__)
_S = Shard.__table__.c
_OPEN = [ShardState.PENDING.value, ShardState.QUEUED.value]


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
    identity = embedded_identity(device)
    shard_ids, total, finished = _open_shards(engine, run_id)
    if shard_ids:
        _remove_stale_temporaries_once(settings)
    if progress is not None:
        progress.start(run_id, total, finished)
    _hold(engine, run_id, identity.label)
    # The MLflow run exists (and reads RUNNING, a resume counted) before the first shard, not only after the
    # first throttled progress report: a short run or a Ctrl-C before it would otherwise leave no trace there.
    reporting.prepare_tracking(engine, settings, run_id)
    ready, waiting = deque(shard_ids), []  # waiting: a heap of (due time, shard id) for retries
    interrupted = False
    try:
        state = _run_shards(engine, settings, ready, waiting, identity=identity, device=device, progress=progress)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:  # Ctrl-C, a setup error raised for every shard, a shutdown: nothing more will come from here
        _release(engine, run_id, identity.label)
        if interrupted:
            reporting.report_interrupted(engine, settings, run_id)  # MLflow shows KILLED until `resume`
    if state is Outcome.INTERRUPTED:
        return None
    finalize_run_if_complete(engine, settings, run_id)
    return _terminal_state(engine, run_id)


_CLEANED_ROOTS: set[str] = set()  # artifact roots this process has cleaned (a sweep runs many runs in one)


def _remove_stale_temporaries_once(settings: Settings) -> None:
    """What an earlier run killed mid-write (kill -9) left in the artifact root, once per process and root, as
    `worker` does at its start: listing the root's folders again for every run of a sweep would find nothing."""
    root = str(settings.artifact_root)
    if root in _CLEANED_ROOTS:
        return
    removed = remove_stale_temporaries(settings)
    _CLEANED_ROOTS.add(root)
    if removed:
        log.info("removed %d temporary files that killed writers left in %s", removed, root)


def _hold(engine: Engine, run_id: int, label: str) -> None:
    """Queue the run's open shards for this process: `status` counts a queued shard as held while the process
    its label names lives, so the run does not read as stopped between two shards (or two links of an online
    chain), and does once this process is gone. Running and waiting shards are left as they are. (Two processes
    resuming one run relabel each other's queued shards; the one that exits first makes them pending, so the
    other's run can read stopped between two of its shards until it claims the next.)"""
    with engine.begin() as connection:
        connection.execute(update(Shard.__table__).where(_S.run_id == run_id, _S.state.in_(_OPEN))
                           .values(state=ShardState.QUEUED.value, worker=label))


def _release(engine: Engine, run_id: int, label: str) -> None:
    """Make pending again the shards this process still holds queued (after Ctrl-C, a setup error, a shutdown,
    or with retries left in backoff): no one will deliver them, so the run reads stopped and `resume` takes
    them. Best effort: the error on its way out matters more."""
    try:
        with engine.begin() as connection:
            connection.execute(update(Shard.__table__).where(
                _S.run_id == run_id, _S.state == ShardState.QUEUED.value, _S.worker == label)
                .values(state=ShardState.PENDING.value))
    except SQLAlchemyError:
        log.warning("could not mark the shards of run %s pending again", run_id)


def _run_shards(engine: Engine, settings: Settings, ready: deque[int], waiting: list[tuple[float, int]], *,
                identity: WorkerIdentity, device: str | None, progress: ProgressSink | None) -> Outcome | None:
    """Execute shards until none is left (None) or a shutdown interrupts one (INTERRUPTED)."""
    own = set(ready)  # this run's open shards (a follow-up of another run's is that run's executor's)
    while ready or waiting:
        if not ready:
            _wait_until(waiting[0][0])  # popped after the wait: Ctrl-C during it un-queues the shard
            ready.append(heapq.heappop(waiting)[1])
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
            return Outcome.INTERRUPTED
        # An online chain's next link, which its gate refused while this one waited out a retry: run it now.
        ready.extend(t.shard_id for t in outcome.follow_up if t.shard_id in own and t.shard_id not in ready)
    return None


def _wait_until(due: float) -> None:
    time.sleep(max(0.0, due - time.monotonic()))


def _terminal_state(engine: Engine, run_id: int) -> RunState | None:
    with session_scope(engine) as session:
        state = RunState(session.scalar(select(Run.state).where(Run.id == run_id)))
    return state if state in TERMINAL_RUN_STATES else None
