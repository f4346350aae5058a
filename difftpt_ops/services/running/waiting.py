"""Runs whose samples depend on other work: a DiffTPT run needs its samples' generated images.

A DiffTPT run is bound to one generation config and reads exactly `n_generated` images per sample
(variants 0..n-1). A tune shard is claimable only when every sample in it is ready: its first n variants
exist, or its generation failed (then the DiffTPT run records the sample as failed with that reason,
never tunes it with fewer views). Shards that are not ready wait in state `waiting` with the reason;
a finished generation shard, the workers' periodic check and `resume` make them claimable again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, aliased

from difftpt_ops.core.status import RunState, SampleStatus, ShardState
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import GeneratedImage, Run, Sample, Shard
from difftpt_ops.db.tables import SampleError as SampleErrorRow


@dataclass(frozen=True)
class GenerationNeed:
    """What a run needs from a generation config: `count` images (variants 0..count-1) per sample."""

    config_id: int
    count: int


def generation_need(run: Any) -> GenerationNeed | None:
    """The generated images a run reads per sample, or None when it reads none."""
    if getattr(run, "kind", "tune") != "tune" or run.generation_config_id is None:
        return None
    count = int((run.spec.get("method") or {}).get("n_generated", 0) or 0)
    return GenerationNeed(run.generation_config_id, count) if count > 0 else None


def _generated_count(config_id: int, count: int) -> Any:
    """Scalar subquery: how many of variants 0..count-1 exist for the outer sample's content hash."""
    return (select(func.count()).where(GeneratedImage.generation_config_id == config_id,
                                       GeneratedImage.source_hash == Sample.content_hash,
                                       GeneratedImage.variant_index < count)
            .correlate(Sample).scalar_subquery())


def _generation_errors(config_id: int, source: Any) -> Any:
    """SELECT of the errors generation runs of `config_id` recorded for samples with `source`'s content hash."""
    failed = aliased(Sample)
    return (select(SampleErrorRow.error)
            .join(Run, Run.id == SampleErrorRow.run_id)
            .join(failed, failed.id == SampleErrorRow.sample_id)
            .where(Run.kind == "generate", Run.generation_config_id == config_id,
                   failed.content_hash == source))


def generation_failed_clause(config_id: int) -> Any:
    """EXISTS: a generation run of this config recorded the outer sample's image as failed."""
    return _generation_errors(config_id, Sample.content_hash).correlate(Sample).exists()


def count_unready(connection: Connection | Session, *, version_id: int, need: GenerationNeed, start: int,
                  stop: int) -> int:
    """Samples in [start, stop) that still lack some of their images and whose generation did not fail."""
    query = select(func.count()).select_from(Sample).where(
        Sample.dataset_version_id == version_id, Sample.index >= start, Sample.index < stop,
        Sample.status == SampleStatus.OK.value, Sample.content_hash.is_not(None),
        _generated_count(need.config_id, need.count) < need.count,
        ~generation_failed_clause(need.config_id))
    return int(connection.execute(query).scalar_one())


def waiting_reason(unready: int, total: int, need: GenerationNeed) -> str:
    return (f"waiting for generation config {need.config_id}: {unready} of {total} samples do not have their "
            f"{need.count} generated images yet")


def _unready_reason(session: Session, run: Any, start: int, stop: int) -> str | None:
    """Why the shard [start, stop) of `run` cannot run yet, or None when it can."""
    need = generation_need(run)
    if need is None:
        return None
    unready = count_unready(session, version_id=run.dataset_version_id, need=need, start=start, stop=stop)
    return waiting_reason(unready, stop - start, need) if unready else None


def hold_unready(session: Session, run: Any, shard_ids: list[int]) -> list[int]:
    """Of `shard_ids` (to be queued), move those whose samples are not ready to `waiting` with the reason.

    Returns the ids that are ready. Runs without a generation dependency are always ready.
    """
    if generation_need(run) is None or not shard_ids:
        return shard_ids
    ready = []
    for shard in session.execute(select(Shard.id, Shard.start, Shard.stop).where(Shard.id.in_(shard_ids))).all():
        reason = _unready_reason(session, run, shard.start, shard.stop)
        if reason:
            session.execute(update(Shard).where(Shard.id == shard.id).values(state=ShardState.WAITING,
                                                                           waiting_reason=reason))
        else:
            ready.append(shard.id)
    return sorted(ready)


def release_ready(engine: Engine, *, config_id: int | None = None) -> list[tuple[int, str]]:
    """Waiting shards of running runs (bound to `config_id`, or any) whose samples are now ready become
    queued. Returns (shard id, queue) pairs to send after this commit."""
    released: list[tuple[int, str]] = []
    with session_scope(engine) as session:
        query = (select(Shard.id, Shard.start, Shard.stop, Run.id.label("run_id"))
                 .join(Run, Run.id == Shard.run_id)
                 .where(Shard.state == ShardState.WAITING, Run.state.in_([RunState.RUNNING, RunState.PENDING])))
        if config_id is not None:
            query = query.where(Run.generation_config_id == config_id)
        runs: dict[int, Any] = {}
        for row in session.execute(query.order_by(Shard.run_id, Shard.index)).all():
            run = runs.setdefault(row.run_id, session.get(Run, row.run_id))
            reason = _unready_reason(session, run, row.start, row.stop)
            if reason:
                session.execute(update(Shard).where(Shard.id == row.id).values(waiting_reason=reason))
                continue
            moved = session.execute(update(Shard).where(Shard.id == row.id, Shard.state == ShardState.WAITING)
                                    .values(state=ShardState.QUEUED, waiting_reason=None)).rowcount
            if moved == 1:
                released.append((row.id, "tune"))
    return released


def readiness_error(session: Session, *, version_id: int, need: GenerationNeed, stop: int) -> tuple[int, int]:
    """(samples not ready, samples checked) over the first `stop` samples: for the embedded executor,
    which runs a DiffTPT run only when all its images exist."""
    unready = count_unready(session, version_id=version_id, need=need, start=0, stop=stop)
    checked = session.scalar(select(func.count()).select_from(Sample).where(
        and_(Sample.dataset_version_id == version_id, Sample.index < stop))) or 0
    return unready, int(checked)


def generation_failure(session: Session, *, config_id: int, source_hash: str) -> str | None:
    """The recorded reason a generation run of this config failed on this source image, if it did."""
    row = session.execute(_generation_errors(config_id, source_hash).limit(1)).first()
    return None if row is None else str(row[0])
