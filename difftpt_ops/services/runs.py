"""Runs: plan or attach, split into shards, run or enqueue them; resume, cancel, status and list.

A run is identified by its spec fingerprint. `--limit` is not part of it: it says how much of the run
to plan now, so a larger limit extends the same run with new shards (earlier results are kept) and a
smaller one attaches to the run as it is. Shards cover contiguous ranges of sample indices.

With a broker, shards are marked queued and sent to the Celery queue of their kind after the database
commit; without one (the embedded default) the executor runs them in this process.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import InputError, NotFoundError, ServiceUnavailableError
from difftpt_ops.core.specs import (
    GenerateRunSpec,
    GenerationSpec,
    ModelSpec,
    TuneRunSpec,
    canonical_json,
    method_spec_from,
)
from difftpt_ops.core.status import TERMINAL_RUN_STATES, RunState, ShardState, check_run_transition
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import (
    Dataset,
    DatasetVersion,
    GeneratedImage,
    GenerationConfig,
    Run,
    Sample,
    Shard,
)
from difftpt_ops.db.writes import insert_new_ids
from difftpt_ops.services import executor, online, reporting
from difftpt_ops.services.executor import Dispatcher, ProgressSink, as_utc
from difftpt_ops.services.shards import finalize_run_if_complete, utcnow

STATUS_WINDOW_S = 60.0  # throughput is measured over this recent window
MAX_SHARD_SIZE = 10_000  # a shard's sample ids go into one IN (...) list
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class SubmitResult:
    """What submit or resume did to a run."""

    run_id: int
    kind: str
    method: str
    fingerprint: str
    created: bool  # a new run; False: attached to the run with the same spec
    num_samples: int
    shards_total: int
    shards_new: int
    shards_dispatched: int  # sent to the broker, or run in-process when embedded
    state: str
    embedded: bool
    generation_config_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def check_execution_args(*, limit: int | None, shard_size: int | None, device: str | None = None,
                         seed: int = 0) -> None:
    """Validate the options that are not part of a spec; InputError names the bad one."""
    if limit is not None and limit < 1:
        raise InputError("--limit", limit, "must be >= 1")
    if shard_size is not None and not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise InputError("--shard-size", shard_size, f"must be between 1 and {MAX_SHARD_SIZE}")
    if device is not None and not _DEVICE.match(device):
        raise InputError("--device", device, "must be auto, cpu, mps, cuda or cuda:N")
    if seed < 0:
        raise InputError("--seed", seed, "must be >= 0")


def _check_model_path(settings: Settings, method: str, model: ModelSpec) -> None:
    """An embedded run loads its model here, so a model that cannot exist is bad input before any row is
    written (workers check their own)."""
    if settings.embedded and method != "noop":
        from difftpt_ops.models.clip import check_clip_source

        check_clip_source(model)


def _prepare_dispatch(settings: Settings, dispatcher: Dispatcher | None) -> None:
    """Fail before writing anything when the broker is configured but unreachable."""
    if settings.embedded:
        return
    if dispatcher is None:
        raise ServiceUnavailableError("a broker is configured (DIFFTPT_OPS_BROKER_URL) but no dispatcher was given")
    dispatcher.check()



def shard_ranges(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) cut into ranges of `size` (the last one shorter)."""
    return [(lo, min(lo + size, stop)) for lo in range(start, stop, size)]


def _plan(session: Session, *, kind: str, method: str, fingerprint: str, spec: dict[str, Any],
          version: DatasetVersion, generation_config_id: int | None, limit: int | None,
          shard_size: int, columns: dict[str, Any] | None = None) -> tuple[Run, bool, int]:
    """Create or find the run by fingerprint and add shards up to `limit`. Returns (run, created, new shards)."""
    # 1. The run: insert-ignore on the unique fingerprint, then read it back (two submits may race).
    created = bool(insert_new_ids(session, Run, [{
        "kind": kind, "fingerprint": fingerprint, "spec": spec, "method": method,
        "dataset_version_id": version.id, "generation_config_id": generation_config_id,
        "state": RunState.PENDING, "num_samples": 0, "shard_size": shard_size, "created_at": utcnow(),
        **(columns or {})}]))
    run = session.scalars(select(Run).where(Run.fingerprint == fingerprint)).one()
    # 2. Shards for the sample indices not planned yet, at the run's own shard size.
    target = version.num_samples if limit is None else min(limit, version.num_samples)
    if target <= run.num_samples:
        return run, created, 0
    first = session.scalar(select(func.coalesce(func.max(Shard.index) + 1, 0)).where(Shard.run_id == run.id))
    rows = [{"run_id": run.id, "index": first + i, "start": lo, "stop": hi, "state": ShardState.PENDING}
            for i, (lo, hi) in enumerate(shard_ranges(run.num_samples, target, run.shard_size))]
    new = len(insert_new_ids(session, Shard, rows))
    session.execute(update(Run).where(Run.id == run.id, Run.num_samples < target).values(num_samples=target))
    session.refresh(run)
    return run, created, new


def _generation_for(session: Session, method: Any, version: DatasetVersion, dataset_ref: str,
                    generation_id: int | None) -> GenerationConfig | None:
    """The generation config a run reads: the one named, else the latest planned or filled for this dataset.

    A run that reads generated images is bound to one config, whose images per sample must cover the
    spec's n_generated: the run reads exactly that many per sample, never fewer.
    """
    needed = int(getattr(method, "n_generated", 0) or 0)
    if needed == 0:
        if generation_id is not None:
            raise InputError("--generation", generation_id,
                             f"{method.method} reads no generated images (n_generated is 0)")
        return None
    if generation_id is not None:
        config = session.get(GenerationConfig, generation_id)
        if config is None:
            raise NotFoundError("--generation", generation_id, "no such generation config")
    else:
        config = _latest_generation(session, version)
        if config is None:
            raise InputError("--generation", "latest", f"no generation for {dataset_ref}; run `difftpt-ops submit "
                             f"generate --dataset {dataset_ref}` first, or pass --set n_generated=0")
    per_sample = int(config.spec.get("per_sample", 0))
    if needed > per_sample:
        raise InputError("n_generated", needed, f"exceeds the {per_sample} images per sample of generation config "
                         f"{config.id}; pass --set n_generated={per_sample} or generate more with "
                         f"`difftpt-ops submit generate --dataset {dataset_ref} --per-sample {needed}`")
    return config


def _latest_generation(session: Session, version: DatasetVersion) -> GenerationConfig | None:
    """The newest config with a generation run on this version or images of its samples (imported ones too)."""
    planned = exists().where(Run.kind == "generate", Run.generation_config_id == GenerationConfig.id,
                             Run.dataset_version_id == version.id)
    has_images = exists().where(GeneratedImage.generation_config_id == GenerationConfig.id,
                                GeneratedImage.source_hash == Sample.content_hash,
                                Sample.dataset_version_id == version.id)
    return session.scalar(select(GenerationConfig).where(planned | has_images)
                          .order_by(GenerationConfig.id.desc()).limit(1))


def _require_generated_images(session: Session, version: DatasetVersion, config: GenerationConfig | None,
                              needed: int, stop: int, dataset_ref: str) -> None:
    """Embedded runs execute now, so every sample's images must exist before the run is planned."""
    from difftpt_ops.services.waiting import GenerationNeed, readiness_error

    if config is None or needed == 0:
        return
    unready, checked = readiness_error(session, version_id=version.id, need=GenerationNeed(config.id, needed),
                                       stop=stop)
    if unready:
        raise InputError("--generation", config.id, f"{unready} of {checked} samples do not have their {needed} "
                         f"generated images yet; run `difftpt-ops submit generate --dataset {dataset_ref} "
                         f"--per-sample {config.spec.get('per_sample')}` (or `difftpt-ops resume` on that "
                         "generation run) first")


def resolve_run_device(settings: Settings, device: str | None) -> str:
    """The kind of device a run is for, resolved once at submit and stored in its spec.

    The explicit --device, else DIFFTPT_OPS_DEVICE, else auto: CUDA when this machine has it, else the CPU.
    With a broker, submit from a machine with the same kind of device as the workers, or pass --device.

    Raises:
        InputError: --device cuda in embedded mode on a machine without CUDA.
    """
    chosen = device or settings.device
    kind = chosen.split(":", 1)[0]
    if chosen != "auto" and not (kind == "cuda" and settings.embedded):
        return kind
    import torch

    has_cuda = torch.cuda.is_available()
    if chosen == "auto":
        return "cuda" if has_cuda else "cpu"
    if not has_cuda:
        raise InputError("--device", chosen, "CUDA is not available on this machine (no GPU or no driver); "
                                             "use --device cpu")
    return kind


def run_model_spec(model: str, pretrained: str | None, run_device: str) -> ModelSpec:
    """The model a run is for, with the precision its device implies (fp16 frozen weights on CUDA): "auto"
    would otherwise mean different numbers under one fingerprint."""
    return ModelSpec(name=model, pretrained=pretrained, precision="fp16" if run_device == "cuda" else "fp32")


def _run_columns(spec: TuneRunSpec, method_spec: Any) -> dict[str, Any]:
    """The run's spec fields as plain columns (runs list, run_summary), and its provenance."""
    from difftpt_ops.provenance import environment

    return {"model_name": spec.model.name, "pretrained": spec.model.pretrained, "seed": spec.seed,
            "device": spec.device, "precision": spec.model.precision,
            "settings": non_default_settings(method_spec), "provenance": environment()}


def non_default_settings(method_spec: Any) -> str:
    """The method settings that differ from the method's defaults: "key=value, ..." in key order."""
    from difftpt_ops.core.specs import flatten

    current = flatten({k: v for k, v in method_spec.to_dict().items() if k != "method"})
    defaults = flatten({k: v for k, v in type(method_spec)().to_dict().items() if k != "method"})
    return ", ".join(f"{key}={current[key]}" for key in sorted(current) if current[key] != defaults.get(key))


def _resolve_version(session: Session, dataset_ref: str) -> tuple[Dataset, DatasetVersion]:
    from difftpt_ops.services.datasets import resolve_dataset_version

    dataset, version = resolve_dataset_version(session, dataset_ref)
    if version.num_samples < 1:
        raise InputError("--dataset", dataset_ref, "has no samples")
    return dataset, version


def submit_tune(engine: Engine, settings: Settings, *, dataset_ref: str, method: str, model: str = "ViT-B-16",
                pretrained: str | None = "openai", generation_id: int | None = None,
                overrides: dict[str, Any] | None = None, seed: int = 0, limit: int | None = None,
                shard_size: int | None = None, dispatcher: Dispatcher | None = None, device: str | None = None,
                progress: ProgressSink | None = None) -> SubmitResult:
    """Plan a tuning run (or attach to the one with the same spec) and run or enqueue its open shards.

    Raises:
        InputError: a bad argument (nothing is written).
        ServiceUnavailableError: the database or the broker cannot be reached.
    """
    # 1. Validate everything that needs no database.
    check_execution_args(limit=limit, shard_size=shard_size, device=device, seed=seed)
    online.ensure_registered(method)
    method_spec = method_spec_from(method, overrides or {})
    run_device = resolve_run_device(settings, device)
    model_spec = run_model_spec(model, pretrained, run_device)
    _check_model_path(settings, method_spec.method, model_spec)
    _prepare_dispatch(settings, dispatcher)
    # 2. Resolve the dataset and the generation config, then plan the run.
    with session_scope(engine) as session:
        dataset, version = _resolve_version(session, dataset_ref)
        method_spec = online.resolve_for_dataset(method_spec, dataset.format)  # e.g. TDA's per-dataset config
        config = _generation_for(session, method_spec, version, dataset_ref, generation_id)
        if settings.embedded:
            stop = version.num_samples if limit is None else min(limit, version.num_samples)
            _require_generated_images(session, version, config, int(getattr(method_spec, "n_generated", 0) or 0),
                                      stop, dataset_ref)
        spec = TuneRunSpec(method=method_spec, model=model_spec, dataset_fingerprint=version.fingerprint,
                           generation_fingerprint=config.fingerprint if config else None, seed=seed,
                           device=run_device)
        run, created, new = _plan(session, kind="tune", method=method_spec.method, fingerprint=spec.fingerprint(),
                                  spec=spec.to_dict(), version=version, limit=limit,
                                  generation_config_id=config.id if config else None,
                                  shard_size=shard_size or settings.shard_size,
                                  columns=_run_columns(spec, method_spec))
    # 3. Run or enqueue what is left.
    return _start(engine, settings, run, created=created, new=new, dispatcher=dispatcher, device=device,
                  progress=progress)


def submit_generate(engine: Engine, settings: Settings, *, dataset_ref: str, spec: GenerationSpec,
                    limit: int | None = None, shard_size: int | None = None, batch_size: int = 4,
                    dispatcher: Dispatcher | None = None, device: str | None = None,
                    progress: ProgressSink | None = None) -> SubmitResult:
    """Plan a generation run for a dataset version (or attach to the same one) and run or enqueue it."""
    from difftpt_ops.services.generation import get_or_create_generation_config

    check_execution_args(limit=limit, shard_size=shard_size, device=device, seed=spec.seed)
    if batch_size < 1:
        raise InputError("--batch-size", batch_size, "must be >= 1")
    _prepare_dispatch(settings, dispatcher)
    from difftpt_ops.models.diffusion import resolve_dtype_name
    from difftpt_ops.provenance import environment

    run_device = resolve_run_device(settings, device)
    # "auto" dtype is resolved here: fp16 and fp32 give different pixels, so they are different configs.
    spec = dataclasses.replace(spec, dtype=resolve_dtype_name(spec.dtype, run_device))
    with session_scope(engine) as session:
        _, version = _resolve_version(session, dataset_ref)
        config = get_or_create_generation_config(session, spec)
        run_spec = GenerateRunSpec(generation=spec, dataset_fingerprint=version.fingerprint, device=run_device,
                                   batch_size=batch_size)
        columns = {"model_name": spec.model, "seed": spec.seed, "device": run_device, "precision": spec.dtype,
                   "provenance": environment()}
        run, created, new = _plan(session, kind="generate", method="generate", fingerprint=run_spec.fingerprint(),
                                  spec=run_spec.to_dict(), version=version,
                                  generation_config_id=config.id, limit=limit,
                                  shard_size=shard_size or settings.shard_size, columns=columns)
    return _start(engine, settings, run, created=created, new=new, dispatcher=dispatcher, device=device,
                  progress=progress)



def _get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFoundError("RUN", run_id, "no such run; see `difftpt-ops runs list`")
    return run


def _reopen(engine: Engine, run_id: int) -> int:
    """Give failed and cancelled shards fresh attempts; make the run running if it has open shards.

    Returns the number of open shards.
    """
    with session_scope(engine) as session:
        run = _get_run(session, run_id)
        session.execute(update(Shard).where(
            Shard.run_id == run_id, Shard.state.in_([ShardState.FAILED, ShardState.CANCELLED])
        ).values(state=ShardState.PENDING, attempts=0, error=None, finished_at=None))
        open_shards = session.scalar(select(func.count()).where(Shard.run_id == run_id, Shard.state.in_(
            [ShardState.PENDING, ShardState.QUEUED, ShardState.RUNNING, ShardState.WAITING]))) or 0
        if open_shards and run.state != RunState.RUNNING:
            check_run_transition(RunState(run.state), RunState.RUNNING)
            run.state, run.finished_at, run.error = RunState.RUNNING, None, None
            run.started_at = run.started_at or utcnow()
    return int(open_shards)


def _start(engine: Engine, settings: Settings, run: Run, *, created: bool, new: int,
           dispatcher: Dispatcher | None, device: str | None, progress: ProgressSink | None,
           include_queued: bool = False) -> SubmitResult:
    """Run (embedded) or enqueue (broker) the open shards of a run that was just planned or resumed."""
    dispatched = 0
    # A finished run with nothing new is the common resubmit: answer without touching its shards.
    if created or new or run.state not in (RunState.FINISHED, RunState.FINISHED_WITH_FAILURES):
        open_shards = _reopen(engine, run.id)
        if settings.embedded:
            dispatched = open_shards
            _run_embedded_or_fail(engine, settings, run.id, device=device, progress=progress)
        else:
            tickets = executor.queue_open_shards(engine, settings, run.id, run.kind, include_queued=include_queued)
            if tickets:
                assert dispatcher is not None
                executor.send_tickets(dispatcher, tickets, run.id)
            dispatched = len(tickets)
        finalize_run_if_complete(engine, settings, run.id)
    with session_scope(engine) as session:
        state = session.scalar(select(Run.state).where(Run.id == run.id))
        shards_total = session.scalar(select(func.count()).where(Shard.run_id == run.id)) or 0
    return SubmitResult(run_id=run.id, kind=run.kind, method=run.method, fingerprint=run.fingerprint,
                        created=created, num_samples=run.num_samples, shards_total=int(shards_total),
                        shards_new=new, shards_dispatched=dispatched, state=str(state), embedded=settings.embedded,
                        generation_config_id=run.generation_config_id)


def _run_embedded_or_fail(engine: Engine, settings: Settings, run_id: int, *, device: str | None,
                          progress: ProgressSink | None) -> None:
    """Run in-process; a setup error (weights unreachable, a model that does not load, a dataset root that
    is gone) marks the run failed with the reason, so no run is left `running` with nothing behind it.
    Submitting the same spec again (or `resume`) starts it again."""
    try:
        executor.run_embedded(engine, settings, run_id, device=device, progress=progress)
    except (InputError, ServiceUnavailableError) as exc:
        _mark_failed(engine, run_id, str(exc))
        raise


def _mark_failed(engine: Engine, run_id: int, reason: str) -> None:
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            return
        if run.state == RunState.FAILED:  # finalized already (its shard failed): keep the actual reason
            run.error = reason[:4000]
            return
        if run.state in TERMINAL_RUN_STATES:
            return
        check_run_transition(RunState(run.state), RunState.FAILED)
        run.state, run.error, run.finished_at = RunState.FAILED, reason[:4000], utcnow()


def resume_run(engine: Engine, settings: Settings, run_id: int, *, dispatcher: Dispatcher | None = None,
               device: str | None = None, progress: ProgressSink | None = None) -> SubmitResult:
    """Finish a run: failed and cancelled shards get fresh attempts; pending, queued (their message may
    be lost with a broker restart) and stale running shards are run or enqueued again.
    Duplicate messages are harmless: a shard is claimed once.
    """
    from difftpt_ops.services.waiting import generation_need

    _prepare_dispatch(settings, dispatcher)
    with session_scope(engine) as session:
        run = _get_run(session, run_id)
        need = generation_need(run)
        if settings.embedded and need is not None:
            version = session.get(DatasetVersion, run.dataset_version_id)
            config = session.get(GenerationConfig, need.config_id)
            _require_generated_images(session, version, config, need.count,  # type: ignore[arg-type]
                                      run.num_samples, f"@{run.dataset_version_id}")
    return _start(engine, settings, run, created=False, new=0, dispatcher=dispatcher, device=device,
                  progress=progress, include_queued=True)


def cancel_run(engine: Engine, settings: Settings, run_id: int) -> dict[str, Any]:
    """Cancel a run: its open shards are cancelled; running ones stop at their next batch."""
    with session_scope(engine) as session:
        run = _get_run(session, run_id)
        if run.state == RunState.CANCELLED:
            return {"run_id": run_id, "state": run.state, "shards_cancelled": 0}
        if not is_active(run.state):
            raise InputError("RUN", run_id, f"is {run.state}; only pending or running runs can be cancelled")
        check_run_transition(RunState(run.state), RunState.CANCELLED)
        cancelled = session.execute(update(Shard).where(
            Shard.run_id == run_id,
            Shard.state.in_([ShardState.PENDING, ShardState.QUEUED, ShardState.RUNNING, ShardState.WAITING])
        ).values(state=ShardState.CANCELLED, finished_at=utcnow())).rowcount
        run.state, run.finished_at = RunState.CANCELLED, utcnow()
    reporting.report_finished(engine, settings, run_id)
    return {"run_id": run_id, "state": RunState.CANCELLED.value, "shards_cancelled": cancelled}


def _iso(moment: datetime | None) -> str | None:
    return as_utc(moment).isoformat() if moment is not None else None


def _counters(session: Session, run_ids: list[int]) -> dict[int, tuple[int, int]]:
    rows = session.execute(select(Shard.run_id, func.sum(Shard.samples_done), func.sum(Shard.samples_failed))
                           .where(Shard.run_id.in_(run_ids)).group_by(Shard.run_id)).all()
    return {run_id: (int(done or 0), int(failed or 0)) for run_id, done, failed in rows}


def _run_rows(session: Session, *, run_id: int | None = None, active: bool = False,
              limit: int | None = None) -> list[Any]:
    query = (select(Run, Dataset.name, DatasetVersion.version)
             .join(DatasetVersion, DatasetVersion.id == Run.dataset_version_id)
             .join(Dataset, Dataset.id == DatasetVersion.dataset_id).order_by(Run.id.desc()))
    if run_id is not None:
        query = query.where(Run.id == run_id)
    if active:
        query = query.where(Run.state.not_in([state.value for state in TERMINAL_RUN_STATES]))
    return list(session.execute(query.limit(limit)).all())


def _summary(run: Run, dataset: str, version: int, counters: tuple[int, int]) -> dict[str, Any]:
    done, failed = counters
    return {"run_id": run.id, "kind": run.kind, "method": run.method, "dataset": f"{dataset}@{version}",
            "model": run.model_name, "pretrained": run.pretrained, "seed": run.seed, "device": run.device,
            "precision": run.precision, "settings": run.settings,
            "state": run.state, "num_samples": run.num_samples, "done": done, "failed": failed,
            "pending": max(run.num_samples - done - failed, 0), "generation_config_id": run.generation_config_id,
            "created_at": _iso(run.created_at), "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at), "error": run.error}


def list_runs(engine: Engine, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Every run, newest first, with its sample counts."""
    from difftpt_ops.services.features import view_counts

    with session_scope(engine) as session:
        rows = _run_rows(session, limit=limit)
        counters = _counters(session, [row[0].id for row in rows])
        views = view_counts(session, [row[0].id for row in rows])
    return [{**_summary(run, name, version, counters.get(run.id, (0, 0))), **views[run.id]}
            for run, name, version in rows]


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
        rate = executor.recent_throughput(session, run, now, window_s=STATUS_WINDOW_S)
    elif run.started_at and run.finished_at:
        elapsed = (as_utc(run.finished_at) - as_utc(run.started_at)).total_seconds()
        rate = (summary["done"] + summary["failed"]) / elapsed if elapsed > 0 else None
    else:
        rate = None
    eta = summary["pending"] / rate if rate and is_active(run.state) else None
    unit = "samples"
    if run.kind == "generate" and rate is not None:
        # A generation run's unit of work is a sample, but what users size and compare is images.
        rate, unit = rate * int(run.spec.get("generation", {}).get("per_sample", 1)), "images"
    summary.update(
        shards=shards, throughput=round(rate, 3) if rate is not None else None, throughput_unit=unit,
        eta_s=round(eta, 1) if eta is not None else None,
        workers=executor.active_workers(running, now=now, stale_after_s=settings.stale_after_s),
        failed_shards=[{"shard": index, "error": (error or "").strip().splitlines()[-1:]} for index, error in failures],
        waiting_shards=[{"shard": index, "reason": reason} for index, reason in waiting])


def run_status(engine: Engine, settings: Settings, run_id: int | None = None) -> list[dict[str, Any]]:
    """Status of one run, or of the active runs (none when no run is active).

    Raises:
        NotFoundError: `run_id` names no run.
    """
    from difftpt_ops.services.features import view_counts

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
        for run, name, version in rows:
            summary = {**_summary(run, name, version, counters.get(run.id, (0, 0))), **views[run.id]}
            _details(session, settings, run, summary, now)
            out.append(summary)
    return out


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
        run, name, version = rows[0]
        summary = _summary(run, name, version, _counters(session, [run.id]).get(run.id, (0, 0)))
        facts = session.execute(select(Shard.index, Shard.provenance).where(Shard.run_id == run.id)
                                .order_by(Shard.index)).all()
        summary.update(fingerprint=run.fingerprint, spec=run.spec, provenance=run.provenance,
                       mlflow_run_id=run.mlflow_run_id, generation_config_id=run.generation_config_id)
    groups: dict[str, dict[str, Any]] = {}
    for index, provenance in facts:
        if provenance is None:
            continue
        key = canonical_json(provenance)
        group = groups.setdefault(key, {**provenance, "shards": []})
        group["shards"].append(index)
    summary["shard_provenance"] = list(groups.values())
    return summary
