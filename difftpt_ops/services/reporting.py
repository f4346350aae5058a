"""Hooks the shard executor calls as a run progresses; the tracking issue fills them with MLflow logging.

Contract: these never raise. If tracking fails, the run is marked `mlflow_sync_needed` and
`difftpt-ops mlflow sync` catches up later; the database stays the source of truth.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings


def report_progress(engine: Engine, settings: Settings, run_id: int) -> None:
    """Called after each committed batch of samples of a run."""


def report_finished(engine: Engine, settings: Settings, run_id: int) -> None:
    """Called once a run reaches a terminal state."""
