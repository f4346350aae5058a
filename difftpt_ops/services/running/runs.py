"""Runs: plan or attach, split into shards, run or enqueue them; resume and cancel (`status` reads them).

A run is identified by its spec fingerprint. `--limit` is not part of it: it says how much of the run
to plan now, so a larger limit extends the same run with new shards (earlier results are kept) and a
smaller one attaches to the run as it is. Shards cover contiguous ranges of sample indices.

With a broker, shards are marked queued and sent to the Celery queue of their kind after the database
commit (`dispatch`); without one (the embedded default) `embedded` runs them in this process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from difftpt_ops.config import Settings
from difftpt_ops.core.clock import utcnow
from difftpt_ops.core.errors import InputError, NotFoundError, ServiceUnavailableError
from difftpt_ops.core.method_specs import MethodSpec, method_spec_from, resolve_for_dataset
from difftpt_ops.core.run_specs import GenerateRunSpec, TuneRunSpec
from difftpt_ops.core.specs import GenerationSpec, ModelSpec
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
from difftpt_ops.services.reading import reporting
from difftpt_ops.services.running import online
from difftpt_ops.services.running.descriptions import resolve_descriptions, store_descriptions
from difftpt_ops.services.running.dispatch import Dispatcher, queue_open_shards, send_tickets
from difftpt_ops.services.running.embedded import ProgressSink, run_embedded
from difftpt_ops.services.running.finalize import finalize_run_if_complete
from difftpt_ops.services.running.generation import get_or_create_generation_config, spec_of
from difftpt_ops.services.running.status import is_active
from difftpt_ops.services.running.submit_checks import (
    check_execution_args,
    check_method_classes,
    check_method_files,
    check_model_path,
    check_stream_blocks,
    generator_path_checked,
    resolve_method_paths,
    resolve_run_device,
    run_model_spec,
    stream_block,
)


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
    dataset: str | None = None  # NAME@V of the run: another name's, when that dataset holds the same samples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prepare_dispatch(settings: Settings, dispatcher: Dispatcher | None) -> None:
    """Fail before writing anything when the broker is configured but unreachable."""
    if settings.embedded:
        return
    if dispatcher is None:
        raise ServiceUnavailableError("a broker is configured (DIFFTPT_OPS_BROKER_URL) but no dispatcher was given")
    dispatcher.check()


def default_shard_size(settings: Settings, method: MethodSpec) -> int:
    """Samples per shard when `--shard-size` is not given: `online_shard_size` for online methods (a
    checkpoint per shard; rounded up to a multiple of the batch of a method that predicts in batches), `shard_size`
    for the rest."""
    if not online.is_online_method(method.method):
        return settings.shard_size
    block = stream_block(method)
    return -(-settings.online_shard_size // block) * block


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
                    generation_id: int | None, *, missing_ok: bool = False,
                    features: bool = False) -> GenerationConfig | None:
    """The generation config a run reads: the one named, else the latest planned or filled for this dataset.

    A run that reads generated images is bound to one config, whose images per sample must cover the
    spec's n_generated: the run reads exactly that many per sample, never fewer. `missing_ok`: None when
    the dataset has no generation yet instead of an error (a dry run planned before `submit generate`).
    `features`: for `submit features --views`, which has no --set: its errors name --views instead.
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
        if config is None and missing_ok:
            return None
        if config is None:
            instead = "or use --views tpt" if features else "or pass --set n_generated=0"
            raise InputError("--generation", "latest", f"no generation for {dataset_ref}; run `difftpt-ops submit "
                             f"generate --dataset {dataset_ref}` first, {instead}")
    per_sample = spec_of(config).per_sample
    if needed > per_sample:
        generate = f"`difftpt-ops submit generate --dataset {dataset_ref} --per-sample {needed}`"
        if features:
            raise InputError("--views", method.method, f"stores {needed} generated views per sample (its default "
                             f"n_generated), but generation config {config.id} has {per_sample} per sample; generate "
                             f"more with {generate}, or use --views tpt")
        raise InputError("n_generated", needed, f"exceeds the {per_sample} images per sample of generation config "
                         f"{config.id}; pass --set n_generated={per_sample} or generate more with {generate}")
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


def check_images_ready(session: Session, settings: Settings, plan: TunePlan, *, limit: int | None,
                       dataset_ref: str) -> None:
    """An embedded run executes now, so every sample it plans (up to `limit`) must have its generated images before
    the run is planned (workers wait for them instead). InputError naming --generation otherwise."""
    if not settings.embedded:
        return
    version = plan.version
    stop = version.num_samples if limit is None else min(limit, version.num_samples)
    _require_generated_images(session, version, plan.config, int(getattr(plan.spec.method, "n_generated", 0) or 0),
                              stop, dataset_ref)


def _require_generated_images(session: Session, version: DatasetVersion, config: GenerationConfig | None,
                              needed: int, stop: int, dataset_ref: str) -> None:
    from difftpt_ops.services.running.waiting import GenerationNeed, readiness_error

    if config is None or needed == 0:
        return
    unready, checked = readiness_error(session, version_id=version.id, need=GenerationNeed(config.id, needed),
                                       stop=stop)
    if unready:
        raise InputError("--generation", config.id, f"{unready} of {checked} samples do not have their {needed} "
                         f"generated images yet; run `difftpt-ops submit generate --dataset {dataset_ref} "
                         f"--per-sample {spec_of(config).per_sample}` (or `difftpt-ops resume` on that "
                         "generation run) first")


def _run_columns(spec: TuneRunSpec, dataset_format: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """The run's spec fields as plain columns (runs list, run_summary), and its provenance. `settings` is the
    run's configuration as `table` names its row: what differs from the method's defaults for the dataset."""
    from difftpt_ops.services.reading.configurations import configuration

    return {"model_name": spec.model.name, "pretrained": spec.model.pretrained, "seed": spec.seed,
            "device": spec.device, "precision": spec.model.precision,
            "settings": configuration(spec.to_dict(), dataset_format), "provenance": provenance}


def _submit_environment() -> dict[str, Any]:
    """The submitting machine's provenance. Called before any transaction opens: the first call in a process
    imports torch and runs git, and a transaction held open meanwhile stalls concurrent submits (PostgreSQL
    showed them idle in transaction for seconds, minutes under load)."""
    from difftpt_ops.provenance import environment

    return environment()


def _resolve_version(session: Session, dataset_ref: str) -> tuple[Dataset, DatasetVersion]:
    from difftpt_ops.services.datasets import resolve_dataset_version

    dataset, version = resolve_dataset_version(session, dataset_ref)
    if version.num_samples < 1:
        raise InputError("--dataset", dataset_ref, "has no samples")
    return dataset, version


@dataclass(frozen=True)
class TunePlan:
    """What a `submit tune` resolves before planning: the run's spec (its identity) and where it reads from."""

    spec: TuneRunSpec
    dataset: Dataset
    version: DatasetVersion
    config: GenerationConfig | None  # the generation config a DiffTPT run reads
    descriptions: bytes | None = None  # a class descriptions file named by path: the bytes submit stores


@dataclass(frozen=True)
class TuneChoice:
    """What a `submit tune` settles before the database: the method spec (validated, not yet resolved per
    dataset), the model spec and the kind of device."""

    method: MethodSpec
    model: ModelSpec
    device: str


def tune_choice(settings: Settings, *, method: str, overrides: dict[str, Any] | None, model: str,
                pretrained: str | None, device: str | None) -> TuneChoice:
    """The method spec with its overrides, the device the run is for and the model precision it implies.

    Raises:
        InputError: an unknown method or field, a bad value, a device this machine does not have.
    """
    online.ensure_registered(method)
    method_spec = resolve_method_paths(method_spec_from(method, overrides or {}))
    check_method_files(settings, method_spec)
    run_device = resolve_run_device(settings, device)
    return TuneChoice(method_spec, run_model_spec(model, pretrained, run_device), run_device)


def resolve_tune_spec(session: Session, settings: Settings, choice: TuneChoice, *, dataset_ref: str,
                      generation_id: int | None, seed: int, generation_missing_ok: bool = False) -> TunePlan:
    """The spec `submit tune` plans, resolved as it is stored: the method's per-dataset defaults and the
    generation config it reads. The dry run uses it too, so it finds the run a submit would attach to by
    its fingerprint (`generation_missing_ok`: a DiffTPT dry run before `submit generate`, which has no
    config yet and so no run either). A class descriptions file named by path becomes the key of its
    content; the plan carries the bytes for submit to store (a dry run stores nothing).

    Raises:
        InputError / NotFoundError: a dataset or generation that does not exist, or one that cannot serve.
    """
    dataset, version = _resolve_version(session, dataset_ref)
    method_spec = resolve_for_dataset(choice.method, dataset.format)  # e.g. TDA's per-dataset config
    check_method_classes(method_spec, dataset.class_names)  # e.g. RLCF's sample_k within the classes
    method_spec, descriptions = resolve_descriptions(settings, method_spec, dataset.class_names)
    config = _generation_for(session, method_spec, version, dataset_ref, generation_id,
                             missing_ok=generation_missing_ok)
    spec = TuneRunSpec(method=method_spec, model=choice.model, dataset_fingerprint=version.fingerprint,
                       generation_fingerprint=config.fingerprint if config else None, seed=seed,
                       device=choice.device)
    return TunePlan(spec, dataset, version, config, descriptions)


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
    choice = tune_choice(settings, method=method, overrides=overrides, model=model, pretrained=pretrained,
                         device=device)
    check_model_path(settings, choice.method.method, choice.model)
    _prepare_dispatch(settings, dispatcher)
    # Slow first calls (imports, git) happen here, before any transaction: see _submit_environment.
    provenance, shard_size = _submit_environment(), shard_size or default_shard_size(settings, choice.method)
    # 2. Resolve the spec as it is stored (per-dataset defaults, generation config), then plan the run.
    with session_scope(engine) as session:
        plan = resolve_tune_spec(session, settings, choice, dataset_ref=dataset_ref, generation_id=generation_id,
                                 seed=seed)
    spec, version, config = plan.spec, plan.version, plan.config
    check_stream_blocks(spec.method, limit=limit, shard_size=shard_size, n_samples=version.num_samples)
    if plan.descriptions is not None:  # the file before the run that names it; written (fsync) outside a transaction
        store_descriptions(settings, spec.method.descriptions, plan.descriptions)  # type: ignore[attr-defined]
    with session_scope(engine) as session:  # a second transaction: _plan finds or creates the run by fingerprint
        check_images_ready(session, settings, plan, limit=limit, dataset_ref=dataset_ref)
        run, created, new = _plan(session, kind="tune", method=spec.method.method, fingerprint=spec.fingerprint(),
                                  spec=spec.to_dict(), version=version, limit=limit,
                                  generation_config_id=config.id if config else None, shard_size=shard_size,
                                  columns=_run_columns(spec, plan.dataset.format, provenance))
    # 3. Run or enqueue what is left.
    return _start(engine, settings, run, created=created, new=new, dispatcher=dispatcher, device=device,
                  progress=progress)


def submit_generate(engine: Engine, settings: Settings, *, dataset_ref: str, spec: GenerationSpec,
                    limit: int | None = None, shard_size: int | None = None, batch_size: int = 4,
                    dispatcher: Dispatcher | None = None, device: str | None = None,
                    progress: ProgressSink | None = None) -> SubmitResult:
    """Plan a generation run for a dataset version (or attach to the same one) and run or enqueue it."""
    check_execution_args(limit=limit, shard_size=shard_size, device=device, seed=spec.seed)
    if batch_size < 1:
        raise InputError("--batch-size", batch_size, "must be >= 1")
    _prepare_dispatch(settings, dispatcher)
    from difftpt_ops.models.diffusion import resolve_dtype_name

    run_device = resolve_run_device(settings, device)
    # "auto" dtype is resolved here: fp16 and fp32 give different pixels, so they are different configs.
    spec = dataclasses.replace(spec, dtype=resolve_dtype_name(spec.dtype, run_device))
    spec = generator_path_checked(settings, spec)
    provenance = _submit_environment()  # before the transaction, whose config insert other submits wait on
    with session_scope(engine) as session:
        _, version = _resolve_version(session, dataset_ref)
        config = get_or_create_generation_config(session, spec)
        run_spec = GenerateRunSpec(generation=spec, dataset_fingerprint=version.fingerprint, device=run_device,
                                   batch_size=batch_size)
        columns = {"model_name": spec.model, "seed": spec.seed, "device": run_device, "precision": spec.dtype,
                   "provenance": provenance}
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
            tickets = queue_open_shards(engine, settings, run.id, run.kind, include_queued=include_queued)
            if tickets:
                assert dispatcher is not None
                send_tickets(engine, dispatcher, tickets, run.id)
            dispatched = len(tickets)
        finalize_run_if_complete(engine, settings, run.id)
    with session_scope(engine) as session:
        state = session.scalar(select(Run.state).where(Run.id == run.id))
        shards_total = session.scalar(select(func.count()).where(Shard.run_id == run.id)) or 0
        name, version = session.execute(select(Dataset.name, DatasetVersion.version).join(
            DatasetVersion, DatasetVersion.dataset_id == Dataset.id).where(
            DatasetVersion.id == run.dataset_version_id)).one()
    return SubmitResult(run_id=run.id, kind=run.kind, method=run.method, fingerprint=run.fingerprint,
                        created=created, num_samples=run.num_samples, shards_total=int(shards_total),
                        shards_new=new, shards_dispatched=dispatched, state=str(state), embedded=settings.embedded,
                        generation_config_id=run.generation_config_id, dataset=f"{name}@{version}")


def _run_embedded_or_fail(engine: Engine, settings: Settings, run_id: int, *, device: str | None,
                          progress: ProgressSink | None) -> None:
    """Run in-process; a setup error (weights unreachable, a model that does not load, a dataset root that
    is gone) marks the run failed with the reason, so no run is left `running` with nothing behind it.
    Submitting the same spec again (or `resume`) starts it again."""
    try:
        run_embedded(engine, settings, run_id, device=device, progress=progress)
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
    from difftpt_ops.services.running.waiting import generation_need

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
        run.mlflow_sync_needed = reporting.tracking_enabled(settings)  # cleared by the report (finalize.py)
    reporting.report_finished(engine, settings, run_id)
    return {"run_id": run_id, "state": RunState.CANCELLED.value, "shards_cancelled": cancelled}
