"""A run's context in a worker process: its processor, queue, device and precision, built once per run
and cached (runs are immutable). Picks the processor by run kind: tuning (`processors`), generation
(`generation`), features (`features`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from difftpt_ops.config import Settings
from difftpt_ops.core.errors import InputError, NotFoundError
from difftpt_ops.core.run_specs import GenerateRunSpec, TuneRunSpec
from difftpt_ops.core.specs import ModelSpec, canonical_json
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Dataset, DatasetVersion, Run
from difftpt_ops.services.running.descriptions import descriptions_for
from difftpt_ops.services.running.features import (
    build_features_processor,
    feature_cache_for,
    weights_fingerprint_of,
)
from difftpt_ops.services.running.generated_views import generated_views_for
from difftpt_ops.services.running.generation import GenerateProcessor
from difftpt_ops.services.running.processors import (
    LRU,
    MODELS,
    QUEUE_OF_KIND,
    NoopProcessor,
    RunContext,
    SampleProcessor,
    TuneProcessor,
    execution_device,
    resolve_device,
)
from difftpt_ops.services.running.views_ahead import builds_views_ahead

_CONTEXT_CACHE_SIZE = 4  # contexts hold their tuner: keep few, so evicted models can be freed
_CONTEXTS = LRU(_CONTEXT_CACHE_SIZE)


def clear_caches() -> None:
    """Forget cached models and run contexts (tests; a worker never needs to)."""
    MODELS.clear()
    _CONTEXTS.clear()


def _load_run(engine: Engine, run_id: int) -> tuple[Run, Dataset]:
    with session_scope(engine) as session:
        row = session.execute(
            select(Run, Dataset).join(DatasetVersion, DatasetVersion.id == Run.dataset_version_id)
            .join(Dataset, Dataset.id == DatasetVersion.dataset_id).where(Run.id == run_id)).one_or_none()
        if row is None:
            raise NotFoundError("RUN", run_id, "no such run")
        session.expunge_all()
    return row[0], row[1]


def _build_tune_processor(engine: Engine, settings: Settings, run: Run, dataset: Dataset, *, device: str | None,
                          worker: str) -> SampleProcessor:
    from difftpt_ops.data.formats import is_cross_domain
    from difftpt_ops.models.clip import load_clip, read_coop_checkpoint
    from difftpt_ops.tta import prepare_classifier
    from difftpt_ops.tta.methods import find_method

    run_spec = TuneRunSpec.from_dict(run.spec)
    method, model = run_spec.method, run_spec.model
    # Runs planned before the spec named a device carry none: the settings' device applies to them.
    resolved = execution_device(settings, run.spec.get("device") and run_spec.device, device)
    clip = MODELS.get(("clip", model, resolved), lambda: load_clip(model, resolved))
    class_names = tuple(dataset.class_names)
    checkpoint = method.prompt.coop_checkpoint
    # The run's seed draws the random context (ctx_init none); it is part of the tuner's cache key then.
    init_seed = run_spec.seed if method.prompt.ctx_init is None and not checkpoint else 0

    # A method's reward model (RLCF): a second frozen CLIP from the local folder the spec names, on the run's device
    # and precision, through the same loader.
    registered = find_method(method.method)
    reward_path = registered.reward_model_path(method) if registered is not None else None
    reward = None
    if reward_path:
        reward_spec = ModelSpec(name=reward_path, pretrained=None, precision=clip.precision)
        try:
            reward = MODELS.get(("clip", reward_spec, resolved), lambda: load_clip(reward_spec, resolved))
        except InputError as exc:  # load_clip names --model; this folder was given as --set reward_model
            raise type(exc)("--set reward_model", reward_path, exc.problem) from None

    def build_tuner() -> Any:
        coop_state = read_coop_checkpoint(checkpoint) if checkpoint else None
        return prepare_classifier(clip, list(class_names), method, coop_state=coop_state, init_seed=init_seed,
                                  descriptions=descriptions_for(settings, method), reward=reward)

    tuner = MODELS.get(("tuner", model, resolved, class_names, canonical_json(method.to_dict()), init_seed),
                        build_tuner)
    n_generated = int(getattr(method, "n_generated", 0))
    views = generated_views_for(engine, settings, run, method, n_generated)
    if n_generated > 0 and views is None:
        raise InputError("--generation", None, f"run {run.id} reads {n_generated} generated images per sample "
                                               "but is bound to no generation config")
    # AugMix defaults to on for the cross-domain sets; a spec that sets `augmix` overrides it in the engine.
    processor = TuneProcessor(run_id=run.id, worker=worker, tuner=tuner, root=Path(dataset.root),
                              seed=run_spec.seed, augmix=is_cross_domain(dataset.format), views=views)
    processor.features = feature_cache_for(engine, settings, clip, method, model.name, reward=reward,
                                           reward_name=reward_path)
    processor.device, processor.precision, processor.activation = resolved, clip.precision, clip.activation
    processor.views_ahead = builds_views_ahead(settings.views_ahead, resolved)
    processor.text_groups = len(tuner.learner.groups)
    processor.weights = weights_fingerprint_of(clip)
    if reward is not None:
        processor.reward_weights = weights_fingerprint_of(reward)
    return processor


def _check_root(dataset: Dataset) -> None:
    """A dataset root that is gone fails the run at once, instead of every sample one by one."""
    if not Path(dataset.root).is_dir():
        raise NotFoundError("dataset root", dataset.root, f"of dataset {dataset.name} does not exist (moved or "
                                                          "unmounted?); mount it at the registered path")


def _build_processor(engine: Engine, settings: Settings, run: Run, dataset: Dataset, *, device: str | None,
                     worker: str) -> SampleProcessor:
    if run.method != "noop":
        _check_root(dataset)
    if run.kind == "generate":
        generate = GenerateRunSpec.from_dict(run.spec)
        return GenerateProcessor(engine, settings, config_id=run.generation_config_id,  # type: ignore[arg-type]
                                 spec=generate.generation, root=Path(dataset.root), batch_size=generate.batch_size,
                                 device=device, spec_device=run.spec.get("device") and generate.device)
    if run.kind == "features":
        return build_features_processor(engine, settings, run, dataset, device=device)
    if run.method == "noop":
        return NoopProcessor(run.id, worker)
    return _build_tune_processor(engine, settings, run, dataset, device=device, worker=worker)


def open_run_context(engine: Engine, settings: Settings, run_id: int, *, device: str | None,
                     worker: str) -> RunContext:
    """The run's processor and facts a shard needs, cached per process (runs are immutable)."""

    def build() -> RunContext:
        run, dataset = _load_run(engine, run_id)
        processor = _build_processor(engine, settings, run, dataset, device=device, worker=worker)
        used = getattr(processor, "device", None) or resolve_device(settings, device)
        return RunContext(run.id, run.kind, QUEUE_OF_KIND[run.kind], run.dataset_version_id, processor,
                          counts_results=run.kind == "tune", device=str(used),
                          precision=getattr(processor, "precision", None),
                          generation_config_id=run.generation_config_id)

    return _CONTEXTS.get((str(engine.url), run_id, device, worker), build)
