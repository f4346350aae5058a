"""Finalising a run: the one place a run whose shards are all terminal gets its final state (and its
final MLflow report). Called after every terminal shard, by episodic shards, online chains, the
embedded loop and the workers' periodic check; whoever gets there first moves it, once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings
from difftpt_ops.core.clock import utcnow
from difftpt_ops.core.status import RunState, ShardState, check_run_transition
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Run, Shard
from difftpt_ops.services.reading import reporting

_S = Shard.__table__.c
_OPEN = [ShardState.PENDING.value, ShardState.QUEUED.value, ShardState.RUNNING.value, ShardState.WAITING.value]
# Whether a run has an open shard: an index seek on (run_id, state) that stops at the first one.
_OPEN_SHARDS = select(_S.id).where(_S.run_id == bindparam("b_run"), _S.state.in_(_OPEN)).limit(1)


def final_run_state(failed_shards: int, failed_samples: int) -> RunState:
    """The terminal state of a run whose shards are all terminal."""
    if failed_shards:
        return RunState.FAILED
    return RunState.FINISHED_WITH_FAILURES if failed_samples else RunState.FINISHED


def _run_error(session: Any, run_id: int, failed_shards: int) -> str:
    """The run's error: how many shards failed and the last line of the first one's traceback (the reason)."""
    traceback_text = session.scalar(select(Shard.error).where(Shard.run_id == run_id, Shard.state == ShardState.FAILED)
                                    .order_by(Shard.index).limit(1)) or ""
    lines = [line.strip() for line in traceback_text.splitlines() if line.strip()]
    reason = f": {lines[-1][:500]}" if lines else ""
    return f"{failed_shards} shard(s) failed{reason}; `difftpt-ops status {run_id}` shows the tracebacks"


def finalize_run_if_complete(engine: Engine, settings: Settings, run_id: int) -> RunState | None:
    """Move a run whose shards are all terminal to its final state; once, whoever gets there first."""
    with engine.connect() as connection:  # the common case, shards still open, costs one index seek
        if connection.execute(_OPEN_SHARDS, {"b_run": run_id}).first() is not None:
            return None
    with session_scope(engine) as session:
        failed_shards, failed_samples = session.execute(
            select(func.count().filter(Shard.state == ShardState.FAILED),
                   func.coalesce(func.sum(Shard.samples_failed), 0)).where(Shard.run_id == run_id)).one()
        run_state = session.scalar(select(Run.state).where(Run.id == run_id))
        if session.execute(_OPEN_SHARDS, {"b_run": run_id}).first() is not None or run_state not in (
                RunState.PENDING, RunState.RUNNING):
            return None
        target = final_run_state(failed_shards, failed_samples)
        check_run_transition(RunState(run_state), target)
        error = _run_error(session, run_id, failed_shards) if failed_shards else None
        # Marked for MLflow in the same commit: a worker killed before report_finished ends (it takes seconds)
        # leaves the MLflow run marked, so `difftpt-ops mlflow sync` repairs it; the report clears the mark.
        moved = session.execute(update(Run).where(Run.id == run_id, Run.state == run_state).values(
            state=target, finished_at=utcnow(), error=error,
            mlflow_sync_needed=reporting.tracking_enabled(settings))).rowcount
    if moved != 1:
        return None
    reporting.report_finished(engine, settings, run_id)
    return target
