"""Run, shard and sample states, and which transitions are allowed."""

from __future__ import annotations

from enum import StrEnum

from difftpt_ops.core.errors import InvalidTransitionError


class RunState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    FINISHED_WITH_FAILURES = "finished_with_failures"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ShardState(StrEnum):
    PENDING = "pending"
    WAITING = "waiting"  # its inputs are not ready (a DiffTPT shard's generated images): not claimable
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class SampleStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"


TERMINAL_RUN_STATES = frozenset(
    {RunState.FINISHED, RunState.FINISHED_WITH_FAILURES, RunState.FAILED, RunState.CANCELLED}
)
TERMINAL_SHARD_STATES = frozenset({ShardState.DONE, ShardState.FAILED, ShardState.CANCELLED})

# A finished or failed run may go back to running: resume re-plans its missing work.
_RUN_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.PENDING: frozenset({RunState.RUNNING, RunState.CANCELLED, RunState.FAILED}),
    RunState.RUNNING: frozenset(TERMINAL_RUN_STATES | {RunState.PENDING}),
    RunState.FINISHED: frozenset({RunState.RUNNING}),
    RunState.FINISHED_WITH_FAILURES: frozenset({RunState.RUNNING}),
    RunState.FAILED: frozenset({RunState.RUNNING, RunState.PENDING}),
    RunState.CANCELLED: frozenset({RunState.RUNNING, RunState.PENDING}),
}


def check_run_transition(current: RunState, target: RunState) -> None:
    """Raise InvalidTransitionError unless `current -> target` is allowed (same state is allowed)."""
    if current == target or target in _RUN_TRANSITIONS[current]:
        return
    raise InvalidTransitionError(f"run cannot go from {current.value} to {target.value}")
