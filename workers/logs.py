"""Worker log lines people can act on: run and shard ids instead of Celery task ids, no library bars.

Celery's own per-task lines ("Task difftpt.execute_shard[<uuid>] received/succeeded") name only a task
id; they are lowered to warnings-only and replaced by one line when a shard starts and one when it ends.
Progress bars of the model libraries go to stderr, which Celery logs as a warning per refresh: off.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

log = logging.getLogger("difftpt_ops.worker")
_CELERY_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


@signals.worker_init.connect
def _quiet_worker(**_: Any) -> None:
    from difftpt_ops.models.quiet import silence_library_progress_bars

    silence_library_progress_bars()
    for name in _CELERY_TASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _run_of(shard_id: int) -> int | None:
    from sqlalchemy import select

    from difftpt_ops.db.tables import Shard
    from workers.tasks import _settings_and_engine

    _, engine = _settings_and_engine()
    with engine.connect() as conn:
        return conn.scalar(select(Shard.run_id).where(Shard.id == shard_id))


def _shard_id(args: Any) -> int | None:
    try:
        return int(args[0])
    except (TypeError, ValueError, IndexError):
        return None


@signals.task_prerun.connect
def _shard_started(task_id: str | None = None, args: Any = None, **_: Any) -> None:
    shard_id = _shard_id(args)
    if shard_id is not None:
        log.info("run %s shard %d: started", _run_of(shard_id), shard_id)


@signals.task_postrun.connect
def _shard_ended(task_id: str | None = None, args: Any = None, retval: Any = None, **_: Any) -> None:
    shard_id = _shard_id(args)
    if shard_id is not None:
        log.info("run %s shard %d: %s", _run_of(shard_id), shard_id, retval)
