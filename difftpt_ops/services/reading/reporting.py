"""MLflow reporting of runs: the hooks shard execution calls (`running.shards`, `running.online`,
`running.finalize`), and `difftpt-ops mlflow sync`.

Contract of the hooks: they never raise. If tracking fails, the run is marked `mlflow_sync_needed`
and `difftpt-ops mlflow sync` catches up later; the database stays the source of truth. Every step
is idempotent (params only when missing, metric points only for steps not yet logged, artifacts
overwritten in place), so a sync can be repeated and two workers can report the same run.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, text, update
from sqlalchemy.engine import Connection, Engine

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import DifftptError, InputError, ServiceUnavailableError
from difftpt_ops.core.secrets import mask_url
from difftpt_ops.core.specs import flatten
from difftpt_ops.core.status import TERMINAL_RUN_STATES, RunState
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import DatasetVersion, Run
from difftpt_ops.services.reading.generator import generator_facts, generator_params
from difftpt_ops.services.reading.groups import sweeps_of_runs
from difftpt_ops.services.reading.results import (
    RunInfo,
    gpu_hours,
    load_run_info,
    running_top1,
    summarise,
    write_run_artifacts,
)
from difftpt_ops.tracking.mlflow_tracker import (
    SWEEP_TAG,
    TERMINAL_STATUSES,
    MlflowTracker,
    RunSnapshot,
    run_group_tags,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 300.0  # after a failure, progress reports retry MLflow at most this often (per process)
RUNNING_TOP1 = "running_top1"
SYNC_MARK_TAG = "difftpt.synced"  # "<state>:<done>:<failed>" of the last full sync: artifacts are current
_MLFLOW_STATUS = {RunState.FINISHED: "FINISHED", RunState.FINISHED_WITH_FAILURES: "FINISHED",
                  RunState.FAILED: "FAILED", RunState.CANCELLED: "KILLED"}


@dataclass
class _Progress:
    mlflow_run_id: str
    max_step: int  # the last running-top-1 step logged (by anyone) for this run


_progress: dict[tuple[str, int], _Progress] = {}
_failed_at: dict[tuple[str, int], float] = {}
_trackers: dict[tuple[str, str], MlflowTracker] = {}


TRACKING_OFF = frozenset({"none", "off", "disabled"})  # DIFFTPT_OPS_MLFLOW_TRACKING_URI values that turn MLflow off


def tracking_enabled(settings: Settings) -> bool:
    """False when the tracking URI is `none` (or off/disabled): the hooks then do nothing at all."""
    return settings.mlflow_tracking_uri.strip().lower() not in TRACKING_OFF


def _require_tracking(settings: Settings) -> None:
    if not tracking_enabled(settings):
        raise InputError("DIFFTPT_OPS_MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri,
                         "MLflow tracking is turned off; set a tracking URI to sync")


def tracker_for(settings: Settings) -> MlflowTracker:
    """One tracker (one MlflowClient) per tracking URI and artifact root, per process."""
    key = (settings.mlflow_tracking_uri, str(settings.artifact_root))
    if key not in _trackers:
        _trackers[key] = MlflowTracker(settings.mlflow_tracking_uri, settings.artifact_root)
    return _trackers[key]


def report_progress(engine: Engine, settings: Settings, run_id: int) -> None:
    """Called after each committed batch: running top-1 every `settings.mlflow_log_every` samples."""
    if not tracking_enabled(settings):
        return
    try:
        _report_progress(engine, settings, run_id)
    except Exception as exc:  # noqa: BLE001  the contract: tracking never stops the work
        _tracking_failed(engine, settings, run_id, exc)


PROGRESS_REPORT_INTERVAL_S = 5.0
_next_report: dict[tuple[str, int], float] = {}


def report_progress_throttled(engine: Engine, settings: Settings, run_id: int) -> None:
    """Report progress once this process has worked on the run for PROGRESS_REPORT_INTERVAL_S, then at most
    that often, and rarer when the hook is slow, so it takes at most about a tenth of a worker's time.
    The hook reads the database to catch up, so a skipped call loses nothing (and short runs only get
    the final report). Called after every batch a shard writes."""
    key, started = (str(engine.url), run_id), time.monotonic()
    due = _next_report.setdefault(key, started + PROGRESS_REPORT_INTERVAL_S)
    if started < due:
        return
    report_progress(engine, settings, run_id)
    took = time.monotonic() - started
    _next_report[key] = started + took + max(PROGRESS_REPORT_INTERVAL_S, 9 * took)


def report_finished(engine: Engine, settings: Settings, run_id: int) -> None:
    """Called once a run reaches a terminal state: final metrics, artifacts, MLflow status."""
    if not tracking_enabled(settings):
        return
    _progress.pop((settings.mlflow_tracking_uri, run_id), None)  # a resume starts with a fresh look
    try:
        sync_run(engine, settings, run_id)
    except ServiceUnavailableError:
        pass  # sync_run has marked the run and logged why
    except Exception as exc:  # noqa: BLE001  the contract: tracking never stops the work
        _tracking_failed(engine, settings, run_id, exc)


def report_interrupted(engine: Engine, settings: Settings, run_id: int) -> None:
    """Called when Ctrl-C stops a run this process was executing: its MLflow run shows KILLED (not RUNNING)
    while it is stopped; `resume` sets it RUNNING again and records the resume as tags. Never raises."""
    if not tracking_enabled(settings):
        return
    _progress.pop((settings.mlflow_tracking_uri, run_id), None)  # a resume starts with a fresh look
    try:
        with engine.connect() as conn:
            row = conn.execute(select(Run.state, Run.mlflow_run_id).where(Run.id == run_id)).first()
        if row is None or row.mlflow_run_id is None or RunState(row.state) in TERMINAL_RUN_STATES:
            return
        tracker_for(settings).set_terminated(row.mlflow_run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001  the contract: tracking never stops the work (nor the Ctrl-C)
        _tracking_failed(engine, settings, run_id, exc)


def prepare_tracking(engine: Engine, settings: Settings, run_id: int) -> None:
    """Create the experiment and MLflow run of an active run up front (e.g. at submit); a finished run's is
    report_finished's. Never raises, like the hooks."""
    report_progress(engine, settings, run_id)


def _report_progress(engine: Engine, settings: Settings, run_id: int) -> None:
    key = (settings.mlflow_tracking_uri, run_id)
    with engine.connect() as conn:
        row = conn.execute(select(Run.kind, Run.state, Run.mlflow_sync_needed).where(Run.id == run_id)).first()
        if row is None or RunState(row.state) in TERMINAL_RUN_STATES:
            # A finished run's MLflow run is report_finished's: a progress report arriving after it (a sweep
            # tagging its runs once they ran embedded, another worker's last flush) must not reopen it.
            return
        done = _done(conn, run_id, row.kind)
    every = max(1, settings.mlflow_log_every)
    state = _progress.get(key)
    if state is not None and (done // every) * every <= state.max_step:
        return  # the cheap path: nothing new to log
    if row.mlflow_sync_needed and time.monotonic() - _failed_at.get(key, float("-inf")) < RETRY_AFTER_S:
        return
    tracker = tracker_for(settings)
    if state is None:  # first report in this process (or after a failure): make sure the MLflow run is right
        with engine.connect() as conn:
            info = load_run_info(conn, run_id)
        snapshot = ensure_mlflow_run(engine, tracker, info, active=True)
        state = _Progress(snapshot.run_id, max(tracker.metric_steps(snapshot.run_id, RUNNING_TOP1), default=0))
    if row.kind == "tune":
        state.max_step = _log_running_top1(engine, tracker, state.mlflow_run_id, run_id, every, state.max_step)
    _progress[key] = state
    if row.mlflow_sync_needed:
        _set_sync_needed(engine, run_id, False)


def _done(conn: Connection, run_id: int, kind: str) -> int:
    if kind == "tune":
        query = "SELECT COUNT(*) FROM predictions WHERE run_id = :run_id"
    else:
        query = "SELECT COALESCE(SUM(samples_done), 0) FROM shards WHERE run_id = :run_id"
    return int(conn.execute(text(query), {"run_id": run_id}).scalar_one())


def _log_running_top1(engine: Engine, tracker: MlflowTracker, mlflow_run_id: str, run_id: int, every: int,
                      after: int, *, include_last: bool = False) -> int:
    """Log the running top-1 points past step `after` (and the last prediction's, for a finished run); returns
    the last step logged."""
    with engine.connect() as conn:
        points = [(step, value) for step, value in running_top1(conn, run_id, every, include_last=include_last)
                  if step > after]
    tracker.log_metrics(mlflow_run_id, [(RUNNING_TOP1, value, step) for step, value in points])
    return max([after, *(step for step, _ in points)])


def experiment_name(info: RunInfo) -> str:
    """One MLflow experiment per dataset version."""
    return f"{info.dataset}@v{info.dataset_version}"


def _tags(info: RunInfo) -> dict[str, str]:
    run = info.run
    return {"difftpt.fingerprint": run.fingerprint, "difftpt.run_id": str(run.id), "difftpt.method": run.method,
            "difftpt.kind": run.kind, "difftpt.dataset": info.dataset,
            "difftpt.dataset_version": str(info.dataset_version), "difftpt.state": run.state,
            **run_group_tags(run.spec)}


def provenance_tags(engine: Engine, run: Any) -> dict[str, str]:
    """What produced the run as MLflow tags: `provenance.*` from the submitting machine, and for the facts
    of the machines that ran its shards (device, GPU, precision, activation, host) every distinct value."""
    from difftpt_ops.db.tables import Shard

    tags = {f"provenance.{key}": str(value) for key, value in (run.provenance or {}).items() if value is not None}
    with engine.connect() as conn:
        shard_facts = [facts for (facts,) in conn.execute(select(Shard.provenance).where(
            Shard.run_id == run.id, Shard.provenance.is_not(None)))]
    for key in ("device", "device_name", "gpu_memory_gb", "driver", "precision", "activation", "weights",
                "reward_weights", "text_groups", "host", "torch", "cuda", "git_commit"):
        values = sorted({str(facts[key]) for facts in shard_facts if facts and facts.get(key) is not None})
        if values:
            tags[f"worker.{key}"] = ", ".join(values)[:5000]
    return tags


def _generator_of(engine: Engine, run: Any) -> dict[str, Any] | None:
    if run.generation_config_id is None:
        return None
    with session_scope(engine) as session:
        return generator_facts(session, run)


def _generator_tags(facts: dict[str, Any] | None) -> dict[str, str]:
    """How many of the run's generated images were made here and how many imported (made elsewhere)."""
    if facts is None:
        return {}
    return {"generator.images_made": str(facts["images_made"]),
            "generator.images_imported": str(facts["images_imported"])}


def ensure_mlflow_run(engine: Engine, tracker: MlflowTracker, info: RunInfo, *, active: bool) -> RunSnapshot:
    """The run's MLflow run: by the stored id, else by fingerprint tag, else created; params and tags current.

    With `active`, a run MLflow shows as ended is set back to RUNNING and the resume is recorded as tags.
    """
    run = info.run
    experiment_id = _ensure_experiment(engine, tracker, info)
    snapshot = tracker.get_run(run.mlflow_run_id) if run.mlflow_run_id else None
    if snapshot is None:
        snapshot = tracker.find_run(experiment_id, run.fingerprint)
    if snapshot is None:
        snapshot = _create_run(engine, tracker, info, experiment_id)
    elif run.mlflow_run_id != snapshot.run_id or run.mlflow_experiment_id != snapshot.experiment_id:
        _store_mapping(engine, run.id, snapshot.run_id, snapshot.experiment_id)
    generator = _generator_of(engine, run)
    tracker.log_params(snapshot, {**flatten(run.spec), **generator_params(generator)})
    tags = {k: v for k, v in {**_tags(info), **provenance_tags(engine, run), **_generator_tags(generator)}.items()
            if snapshot.tags.get(k) != v}
    # A run another process finished since the caller looked is report_finished's to show, not to reopen.
    if active and snapshot.status != "RUNNING" and not _has_ended(engine, run.id):
        if snapshot.status in TERMINAL_STATUSES:
            # MLflow params are immutable and do not record a continuation: tags do (mlflow#3228, #4248).
            count = int(snapshot.tags.get("difftpt.resume_count", "0")) + 1
            tags.update({"difftpt.resume_count": str(count),
                         f"difftpt.resumed.{count}": datetime.now(UTC).isoformat(timespec="seconds")})
        tracker.set_running(snapshot.run_id)
    tracker.set_tags(snapshot.run_id, tags)
    return snapshot


def _has_ended(engine: Engine, run_id: int) -> bool:
    with engine.connect() as conn:
        state = conn.scalar(select(Run.state).where(Run.id == run_id))
    return state is None or RunState(state) in TERMINAL_RUN_STATES


def _ensure_experiment(engine: Engine, tracker: MlflowTracker, info: RunInfo) -> str:
    experiment_id = tracker.ensure_experiment(experiment_name(info))
    with engine.begin() as conn:
        conn.execute(update(DatasetVersion).where(
            DatasetVersion.id == info.run.dataset_version_id,
            or_(DatasetVersion.mlflow_experiment_id.is_(None), DatasetVersion.mlflow_experiment_id != experiment_id),
        ).values(mlflow_experiment_id=experiment_id))
    return experiment_id


def _create_run(engine: Engine, tracker: MlflowTracker, info: RunInfo, experiment_id: str) -> RunSnapshot:
    """Create the MLflow run and claim the mapping; if another process claimed it first, use theirs."""
    run = info.run
    new_id = tracker.create_run(experiment_id, f"{run.method} #{run.id}", _tags(info))
    with engine.begin() as conn:
        stored = Run.mlflow_run_id.is_(None) if run.mlflow_run_id is None else Run.mlflow_run_id == run.mlflow_run_id
        claimed = conn.execute(update(Run).where(Run.id == run.id, stored).values(
            mlflow_run_id=new_id, mlflow_experiment_id=experiment_id)).rowcount == 1
        winner = new_id if claimed else conn.execute(select(Run.mlflow_run_id).where(Run.id == run.id)).scalar_one()
    if not claimed:
        tracker.delete_run(new_id)
    snapshot = tracker.get_run(winner)
    if snapshot is None:
        raise ServiceUnavailableError(f"MLflow run {winner} of run {run.id} vanished while it was being created")
    return snapshot


def _store_mapping(engine: Engine, run_id: int, mlflow_run_id: str, experiment_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id).values(
            mlflow_run_id=mlflow_run_id, mlflow_experiment_id=experiment_id))


def _set_sync_needed(engine: Engine, run_id: int, needed: bool) -> None:
    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id, Run.mlflow_sync_needed != needed)
                     .values(mlflow_sync_needed=needed))


def _tracking_failed(engine: Engine, settings: Settings, run_id: int, exc: BaseException) -> None:
    _failed_at[(settings.mlflow_tracking_uri, run_id)] = time.monotonic()
    _progress.pop((settings.mlflow_tracking_uri, run_id), None)  # the next attempt checks the MLflow run again
    log.warning("MLflow tracking of run %s failed (%s: %s); marked for `difftpt-ops mlflow sync`",
                run_id, type(exc).__name__, _first_line(exc))
    try:
        _set_sync_needed(engine, run_id, True)
    except Exception:  # noqa: BLE001  the database itself failed; shard execution will see that too
        log.exception("could not mark run %s for MLflow sync", run_id)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def sync_run(engine: Engine, settings: Settings, run_id: int) -> dict[str, Any]:
    """Bring the run's MLflow run up to date with the database (idempotent).

    Raises NotFoundError for an unknown run and ServiceUnavailableError when MLflow fails; the run is
    then (still) marked for sync.
    """
    _require_tracking(settings)
    with engine.connect() as conn:
        info = load_run_info(conn, run_id)
    tracker = tracker_for(settings)
    try:
        out = _sync(engine, settings, tracker, info)
    except DifftptError:
        raise
    except Exception as exc:
        _tracking_failed(engine, settings, run_id, exc)
        raise ServiceUnavailableError(
            f"MLflow at {mask_url(tracker.tracking_uri)} failed for run {run_id} ({type(exc).__name__}: "
            f"{mask_url(_first_line(exc))}); "
            "the run stays marked: run `difftpt-ops mlflow sync` again once MLflow is reachable") from exc
    _set_sync_needed(engine, run_id, False)
    return out


def _sync(engine: Engine, settings: Settings, tracker: MlflowTracker, info: RunInfo) -> dict[str, Any]:
    run = info.run
    terminal = run.state in TERMINAL_RUN_STATES
    snapshot = ensure_mlflow_run(engine, tracker, info, active=not terminal)
    summary = _summary(engine, info)
    if run.kind == "tune":
        steps = tracker.metric_steps(snapshot.run_id, RUNNING_TOP1)
        _log_running_top1(engine, tracker, snapshot.run_id, run.id, settings.mlflow_log_every, max(steps, default=0),
                          include_last=terminal)
    metrics = _final_metrics(summary, engine, run.id)
    step = int(metrics.get("samples_done", 0))
    changed = [(k, v, step) for k, v in metrics.items() if snapshot.metrics.get(k) != v]
    tracker.log_metrics(snapshot.run_id, changed)
    artifacts: list[str] = []
    mark = f"{run.state}:{summary.get('done')}:{summary.get('failed')}"
    sweeps = ",".join(str(m["sweep_id"]) for m in sweeps_of_runs(engine, [run.id]).get(run.id, []))
    if sweeps and snapshot.tags.get(SWEEP_TAG) != sweeps:  # submit tags it; this repairs a tag MLflow missed
        tracker.set_tags(snapshot.run_id, {SWEEP_TAG: sweeps})
    if terminal and snapshot.tags.get(SYNC_MARK_TAG) != mark:
        artifacts = _log_artifacts(engine, settings, tracker, info, summary, snapshot.run_id)
        tracker.set_tags(snapshot.run_id, {SYNC_MARK_TAG: mark})
    if terminal:
        status = _MLFLOW_STATUS[RunState(run.state)]
        if snapshot.status != status or snapshot.run_id != run.mlflow_run_id:
            tracker.set_terminated(snapshot.run_id, status, _epoch_ms(run.finished_at))
    return {"run_id": run.id, "mlflow_run_id": snapshot.run_id, "experiment_id": snapshot.experiment_id,
            "experiment": experiment_name(info), "state": run.state, "metrics_logged": len(changed),
            "artifacts": artifacts, "synced": True}


def _epoch_ms(moment: datetime | None) -> int | None:
    """Milliseconds since the epoch; SQLite hands timestamps back without a zone, and we store UTC."""
    if moment is None:
        return None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1000)


def _summary(engine: Engine, info: RunInfo) -> dict[str, Any]:
    with engine.connect() as conn:
        if info.run.kind == "tune":
            return summarise(conn, info, by_class=True)
        row = conn.execute(text("""SELECT COALESCE(SUM(samples_done), 0), COALESCE(SUM(samples_failed), 0),
            COALESCE(SUM(seconds), 0) FROM shards WHERE run_id = :run_id"""), {"run_id": info.run.id}).one()
    done, failed, seconds = int(row[0]), int(row[1]), float(row[2])
    return {"done": done, "failed": failed, "mean_seconds": seconds / done if done else None}


def _final_metrics(summary: dict[str, Any], engine: Engine, run_id: int) -> dict[str, float]:
    with engine.connect() as conn:
        hours = gpu_hours(conn, run_id)
    values = {"top1": summary.get("top1"), "top5": summary.get("top5"), "zeroshot_top1": summary.get("zeroshot_top1"),
              "gain": summary.get("gain"), "ece": summary.get("ece"), "samples_done": summary.get("done"),
              "failures": summary.get("failed"), "mean_seconds_per_sample": summary.get("mean_seconds"),
              "gpu_hours": hours}
    return {k: float(v) for k, v in values.items() if v is not None}


def _log_artifacts(engine: Engine, settings: Settings, tracker: MlflowTracker, info: RunInfo,
                   summary: dict[str, Any], mlflow_run_id: str) -> list[str]:
    if info.run.kind != "tune":
        return []
    with tempfile.TemporaryDirectory(prefix="difftpt-mlflow-") as tmp:
        names = write_run_artifacts(engine, settings.artifact_root, info, summary, Path(tmp))
        tracker.log_artifacts(mlflow_run_id, Path(tmp))
    return names


def sync_runs(engine: Engine, settings: Settings, run_id: int | None = None, *,
              every: bool = False) -> list[dict[str, Any]]:
    """Sync one run, every run (`every`), or every run marked for sync (plus ended runs never tracked). Errors
    are per run."""
    _require_tracking(settings)
    if run_id is not None:
        ids = [run_id]
    elif every:
        with engine.connect() as conn:
            ids = list(conn.scalars(select(Run.id).order_by(Run.id)))
    else:
        terminal = [s.value for s in TERMINAL_RUN_STATES]
        with engine.connect() as conn:
            ids = list(conn.scalars(select(Run.id).where(or_(
                Run.mlflow_sync_needed.is_(True), (Run.mlflow_run_id.is_(None) & Run.state.in_(terminal)),
            )).order_by(Run.id)))
    results = []
    for rid in ids:
        try:
            results.append(sync_run(engine, settings, rid))
        except ServiceUnavailableError as exc:
            results.append({"run_id": rid, "synced": False, "error": mask_url(str(exc))})
    return results
