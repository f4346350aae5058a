"""What runs are doing: `runs list`, `status` (shard counts, throughput, ETA, live workers, waiting and
failed shards) and `runs show` (spec, provenance, the machines its shards ran on).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from difftpt_ops.config import Settings
from difftpt_ops.core.clock import as_utc, utcnow
from difftpt_ops.core.errors import NotFoundError
from difftpt_ops.core.run_specs import GenerateRunSpec
from difftpt_ops.core.specs import canonical_json
from difftpt_ops.core.status import TERMINAL_RUN_STATES, TERMINAL_SHARD_STATES, RunState, ShardState
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Dataset, DatasetVersion, GeneratedImage, Prediction, Run, Shard
from difftpt_ops.db.tables import SampleError as SampleErrorRow
from difftpt_ops.services.reading.configurations import configuration
from difftpt_ops.services.reading.generator import generator_facts
from difftpt_ops.services.reading.store import view_counts
from difftpt_ops.services.running.leases import (
    active_workers,
    awaiting_takeover,
    stale_check_interval_s,
    worker_is_gone,
)

STATUS_WINDOW_S = 60.0  # throughput is measured over this recent window


def _images_per_sample(run: Run) -> int:
    """A generate run's images per sample (its unit of work is a sample)."""
    return GenerateRunSpec.from_dict(run.spec).generation.per_sample


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
        count += images / _images_per_sample(run)
    else:
        count += session.scalar(select(func.count()).where(
            Prediction.run_id == run.id, Prediction.created_at >= since)) or 0
    return count / span


def _iso(moment: datetime | None) -> str | None:
    return as_utc(moment).isoformat() if moment is not None else None


def _counters(session: Session, run_ids: list[int]) -> dict[int, tuple[int, int]]:
    rows = session.execute(select(Shard.run_id, func.sum(Shard.samples_done), func.sum(Shard.samples_failed))
                           .where(Shard.run_id.in_(run_ids)).group_by(Shard.run_id)).all()
    return {run_id: (int(done or 0), int(failed or 0)) for run_id, done, failed in rows}


def _run_rows(session: Session, *, run_id: int | None = None, active: bool = False,
              limit: int | None = None) -> list[Any]:
    query = (select(Run, Dataset.name, DatasetVersion.version, Dataset.format)
             .join(DatasetVersion, DatasetVersion.id == Run.dataset_version_id)
             .join(Dataset, Dataset.id == DatasetVersion.dataset_id).order_by(Run.id.desc()))
    if run_id is not None:
        query = query.where(Run.id == run_id)
    if active:
        query = query.where(Run.state.not_in([state.value for state in TERMINAL_RUN_STATES]))
    return list(session.execute(query.limit(limit)).all())


def _summary(run: Run, dataset: str, version: int, dataset_format: str,
             counters: tuple[int, int]) -> dict[str, Any]:
    done, failed = counters
    return {"run_id": run.id, "kind": run.kind, "method": run.method, "dataset": f"{dataset}@{version}",
            "model": run.model_name, "pretrained": run.pretrained, "seed": run.seed,
            "order_seed": _order_seed(run), "device": run.device, "precision": run.precision,
            "settings": _settings(run, dataset_format), "features": _features(run),
            "state": run.state, "num_samples": run.num_samples, "done": done, "failed": failed,
            "pending": max(run.num_samples - done - failed, 0), "generation_config_id": run.generation_config_id,
            "created_at": _iso(run.created_at), "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at), "error": run.error}


def _order_seed(run: Run) -> int | None:
    """An online run's stream-order seed (part of its identity, like the seed); None for other runs."""
    method = (run.spec or {}).get("method") if run.kind == "tune" else None
    value = method.get("order_seed") if isinstance(method, dict) else None
    return int(value) if isinstance(value, int) else None


def _features(run: Run) -> str | None:
    """A tuning run's `features` mode: "store" (the default, left out of stored specs) or "recompute" (every view
    encoded; another run). Not a configuration word (`settings`: it changes no number), so listed apart; None for
    other runs."""
    method = (run.spec or {}).get("method") if run.kind == "tune" else None
    return str(method.get("features", "store")) if isinstance(method, dict) else None


def _settings(run: Run, dataset_format: str) -> str | None:
    """A tuning run's configuration as `table` names its row, computed now: the stored column says the same
    for runs submitted (or migrated) by this release, and this stays right when a later release reads older
    specs with new defaults."""
    return configuration(run.spec, dataset_format) if run.kind == "tune" else run.settings


def list_runs(engine: Engine, settings: Settings, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Every run, newest first, with its sample counts and whether it is stopped (`is_stopped`)."""
    with session_scope(engine) as session:
        rows = _run_rows(session, limit=limit)
        counters = _counters(session, [row[0].id for row in rows])
        views = view_counts(session, [row[0].id for row in rows])
        stopped, _ = _stop_facts(session, settings, [row[0] for row in rows if is_active(row[0].state)])
    return [{**_summary(run, name, version, dataset_format, counters.get(run.id, (0, 0))), **views[run.id],
             "stopped": run.id in stopped} for run, name, version, dataset_format in rows]


def _stop_facts(session: Session, settings: Settings,
                active: list[Run]) -> tuple[set[int], dict[int, list[dict[str, Any]]]]:
    """The ids of the active runs that are stopped (`is_stopped`), in two grouped queries, and their
    `idle_generations`."""
    if not active:
        return set(), {}
    ids, now = [run.id for run in active], utcnow()
    shards: dict[int, dict[str, int]] = defaultdict(dict)
    last_end: dict[int, datetime] = {}  # when each run's latest shard ended
    for run_id, state, n, ended in session.execute(select(Shard.run_id, Shard.state, func.count(),
                                                          func.max(Shard.finished_at)).where(
            Shard.run_id.in_(ids)).group_by(Shard.run_id, Shard.state)):
        shards[run_id][state] = n
        if ended is not None and (run_id not in last_end or as_utc(ended) > last_end[run_id]):
            last_end[run_id] = as_utc(ended)
    running: dict[int, list[Any]] = defaultdict(list)
    queued: dict[int, list[str | None]] = defaultdict(list)
    for row in session.execute(select(Shard.run_id, Shard.state, Shard.index, Shard.worker, Shard.gpu,
                                      Shard.heartbeat_at).where(
            Shard.run_id.in_(ids), Shard.state.in_([ShardState.RUNNING, ShardState.QUEUED]))):
        if row.state == ShardState.RUNNING:
            running[row.run_id].append(row)
        else:
            queued[row.run_id].append(row.worker)
    idle = idle_generations(session, settings, active)
    # A run whose shards have all ended is being finalised (by the worker that ended the last one, the embedded
    # executor, or a worker's next periodic check), not stopped: as long as a takeover would take (leases).
    limit = settings.stale_after_s + stale_check_interval_s(settings.stale_after_s) + 5.0
    finishing = {run_id for run_id in ids if all(ShardState(state) in TERMINAL_SHARD_STATES for state in shards[run_id])
                 and run_id in last_end and (now - last_end[run_id]).total_seconds() <= limit}
    return {run.id for run in active if run.id not in finishing and is_stopped(
        run.state, active_workers(running[run.id], now=now, stale_after_s=settings.stale_after_s),
        queued=held_queued(settings, queued[run.id]) + (0 if settings.embedded else awaiting_takeover(
            running[run.id], now=now, stale_after_s=settings.stale_after_s)),
        waiting=0 if run.id in idle else shards[run.id].get(ShardState.WAITING.value, 0))}, idle


def idle_generations(session: Session, settings: Settings, runs: list[Run]) -> dict[int, list[dict[str, Any]]]:
    """For the tuning runs among `runs` that read generated images and whose generation config has no
    generation run at work (all finished, failed, cancelled or stopped, or none at all): those generation
    runs, by tuning run id. Such a run's waiting shards wait for images nothing is making."""
    configs = {run.id: run.generation_config_id for run in runs
               if run.kind == "tune" and run.generation_config_id is not None}
    if not configs:
        return {}
    generations = list(session.scalars(select(Run).where(
        Run.kind == "generate", Run.generation_config_id.in_(set(configs.values()))).order_by(Run.id)))
    stopped, _ = _stop_facts(session, settings, [g for g in generations if is_active(g.state)])
    working = {g.generation_config_id for g in generations if is_active(g.state) and g.id not in stopped}
    return {run_id: [{"run_id": g.id, "state": "stopped" if g.id in stopped else g.state}
                     for g in generations if g.generation_config_id == config]
            for run_id, config in configs.items() if config not in working}


def _details(session: Session, settings: Settings, run: Run, summary: dict[str, Any], now: datetime) -> None:
    """Add shard counts, throughput, ETA and the active workers to a run's summary."""
    shards = dict(session.execute(select(Shard.state, func.count()).where(Shard.run_id == run.id)
                                  .group_by(Shard.state)).all())
    running = session.execute(select(Shard.index, Shard.worker, Shard.gpu, Shard.heartbeat_at).where(
        Shard.run_id == run.id, Shard.state == ShardState.RUNNING)).all()
    failures = session.execute(select(Shard.index, Shard.error).where(
        Shard.run_id == run.id, Shard.state == ShardState.FAILED).order_by(Shard.index).limit(5)).all()
    waiting = session.execute(select(Shard.index, Shard.waiting_reason).where(
        Shard.run_id == run.id, Shard.state == ShardState.WAITING).order_by(Shard.index).limit(5)).all()
    if is_active(run.state):
        rate = recent_throughput(session, run, now, window_s=STATUS_WINDOW_S)
    elif run.started_at and run.finished_at:
        elapsed = (as_utc(run.finished_at) - as_utc(run.started_at)).total_seconds()
        rate = (summary["done"] + summary["failed"]) / elapsed if elapsed > 0 else None
    else:
        rate = None
    stopped_ids, idle_of = _stop_facts(session, settings, [run] if is_active(run.state) else [])
    stopped = run.id in stopped_ids
    idle = idle_of.get(run.id) if shards.get(ShardState.WAITING.value) else None
    eta = summary["pending"] / rate if rate and is_active(run.state) and not stopped else None  # none while stopped
    unit = "samples"
    if run.kind == "generate" and rate is not None:
        # A generation run's unit of work is a sample, but what users size and compare is images.
        rate, unit = rate * _images_per_sample(run), "images"
    summary.update(
        shards=shards, throughput=round(rate, 3) if rate is not None else None, throughput_unit=unit,
        eta_s=round(eta, 1) if eta is not None else None,
        workers=active_workers(running, now=now, stale_after_s=settings.stale_after_s),
        stopped=stopped, idle_generations=idle,
        failed_shards=[{"shard": index, "error": (error or "").strip().splitlines()[-1:]} for index, error in failures],
        waiting_shards=[{"shard": index, "reason": reason} for index, reason in waiting])


def run_status(engine: Engine, settings: Settings, run_id: int | None = None) -> list[dict[str, Any]]:
    """Status of one run, or of the active runs (none when no run is active).

    Raises:
        NotFoundError: `run_id` names no run.
    """
    now = utcnow()
    with session_scope(engine) as session:
        if run_id is not None:
            rows = _run_rows(session, run_id=run_id)
            if not rows:
                raise NotFoundError("RUN", run_id, "no such run; see `difftpt-ops runs list`")
        else:
            rows = _run_rows(session, active=True)
        counters = _counters(session, [row[0].id for row in rows])
        views = view_counts(session, [row[0].id for row in rows])  # encoded vs read from the feature store
        out = []
        for run, name, version, dataset_format in rows:
            summary = {**_summary(run, name, version, dataset_format, counters.get(run.id, (0, 0))),
                       **views[run.id]}
            _details(session, settings, run, summary, now)
            out.append(summary)
    return out


def is_stopped(state: str, workers: list[dict[str, Any]], *, queued: int, waiting: int) -> bool:
    """An active run that nothing is working on and nothing will pick up: no live worker holds one of its
    shards, none of its `queued` shards will be delivered (`held_queued`, plus with a broker the running shards
    a live worker's next stale-shard check will re-queue: `awaiting_takeover`), none of its `waiting` shards
    waits for inputs that something is making (`idle_generations`).

    That is an embedded run after Ctrl-C or a kill, a run whose submit could not reach the broker, a run
    whose workers all died before the lost-worker check re-queued their shards (`resume` continues these),
    or a DiffTPT run waiting on a generation that is not at work (resume that, then the run).
    """
    return is_active(state) and not workers and not queued and not waiting


def held_queued(settings: Settings, labels: list[str | None]) -> int:
    """How many queued shards (given by their last worker label) something will still run. With a broker, all
    of them: their messages are in its queue. Embedded, the executor queues a run's open shards under its own
    label when it starts: held only while that process lives."""
    if not settings.embedded:
        return len(labels)
    return sum(1 for label in labels if label is not None and not worker_is_gone(label))


def is_active(state: str) -> bool:
    """A run that is neither finished, failed nor cancelled."""
    return RunState(state) not in TERMINAL_RUN_STATES


def show_run(engine: Engine, run_id: int) -> dict[str, Any]:
    """Everything about one run: its summary, full spec, provenance, and the machines its shards ran on.

    `shard_provenance` groups the shards by what ran them (device, precision, host and versions), so a
    run whose shards ran on two kinds of GPU shows both, each with its shard count.

    Raises:
        NotFoundError: no such run.
    """
    with session_scope(engine) as session:
        rows = _run_rows(session, run_id=run_id)
        if not rows:
            raise NotFoundError("RUN", run_id, "no such run; see `difftpt-ops runs list`")
        run, name, version, dataset_format = rows[0]
        summary = _summary(run, name, version, dataset_format, _counters(session, [run.id]).get(run.id, (0, 0)))
        facts = session.execute(select(Shard.index, Shard.provenance).where(Shard.run_id == run.id)
                                .order_by(Shard.index)).all()
        summary.update(fingerprint=run.fingerprint, spec=run.spec, provenance=run.provenance,
                       mlflow_run_id=run.mlflow_run_id, generation_config_id=run.generation_config_id,
                       generator=generator_facts(session, run))
    groups: dict[str, dict[str, Any]] = {}
    for index, provenance in facts:
        if provenance is None:
            continue
        key = canonical_json(provenance)
        group = groups.setdefault(key, {**provenance, "shards": []})
        group["shards"].append(index)
    summary["shard_provenance"] = list(groups.values())
    return summary
