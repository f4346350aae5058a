"""Per-sample processing of a run's shard: what a sample's result is and how it is stored.

A `RunContext` (built once per run per process and cached) holds the run's processor:

- `NoopProcessor` (method `noop`): predicts the label without model work, for measuring the system's
  own overhead. Test hooks, honoured by noop only: DIFFTPT_OPS_NOOP_DELAY_S sleeps that long per
  sample (to kill a worker mid-run), DIFFTPT_OPS_NOOP_TRACE appends "run_id sample_index pid" per
  processed sample to that file (to prove a finished sample is not redone).
- `TuneProcessor` (zeroshot, tpt, difftpt): runs the engine's tuner and maps its SampleResult to a
  Prediction row and ViewScore rows.
- `GenerateProcessor` (generate runs): the generation service writes the images itself. Test hook:
  DIFFTPT_OPS_GENERATE_DELAY_S sleeps that long before each sample (generation slower than tuning).

Models load once per process and are reused across shards and runs: the cache is keyed by model spec
and device (the CLIP) and by class names and method spec (the tuner built from it).
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from difftpt_ops.config import Settings
from difftpt_ops.core.clock import utcnow
from difftpt_ops.core.errors import InputError, NotFoundError, NotReadyError, SampleError
from difftpt_ops.core.specs import GenerateRunSpec, GenerationSpec, TuneRunSpec, canonical_json
from difftpt_ops.db.session import session_scope
from difftpt_ops.db.tables import Dataset, DatasetVersion, GeneratedImage, Prediction, Run, ViewScore
from difftpt_ops.db.writes import insert_many_ignore

NOOP_DELAY_ENV = "DIFFTPT_OPS_NOOP_DELAY_S"
NOOP_TRACE_ENV = "DIFFTPT_OPS_NOOP_TRACE"
# Test hook: seconds to sleep before generating each sample (a slow generator, as on a real GPU box).
GENERATE_DELAY_ENV = "DIFFTPT_OPS_GENERATE_DELAY_S"
QUEUE_OF_KIND = {"tune": "tune", "generate": "generate", "features": "tune"}  # features: GPU work, like tuning
_MODEL_CACHE_SIZE = 4  # CLIPs and tuners kept per process (a worker usually serves one or two runs)
_CONTEXT_CACHE_SIZE = 4  # contexts hold their tuner: keep few, so evicted models can be freed

T = TypeVar("T")


class SampleProcessor(Protocol):
    def finished_ids(self, connection: Connection, samples: Sequence[Any]) -> set[int]:
        """Ids of `samples` whose result is already stored."""

    def process(self, sample: Any) -> Any:
        """The result of one sample; raises SampleError when this sample cannot be processed."""

    def write(self, connection: Connection, results: list[Any]) -> None:
        """Store a batch of results (idempotently) inside the caller's transaction."""


@dataclass(frozen=True)
class RunContext:
    run_id: int
    kind: str
    queue: str
    dataset_version_id: int
    processor: SampleProcessor
    counts_results: bool  # results are only written with the shard's counters (tune, not generate)
    device: str = "cpu"  # the torch device this process computes the run on
    precision: str | None = None  # of the frozen weights (tune) or the pipeline (generate)
    generation_config_id: int | None = None




class _LRU:
    """A tiny least-recently-used cache; evicted models are freed with the last reference."""

    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._capacity = capacity

    def get(self, key: Any, build: Callable[[], T]) -> T:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]  # type: ignore[no-any-return]
        value = build()
        self._items[key] = value
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


_MODELS = _LRU(_MODEL_CACHE_SIZE)
_CONTEXTS = _LRU(_CONTEXT_CACHE_SIZE)


def clear_caches() -> None:
    """Forget cached models and run contexts (tests; a worker never needs to)."""
    _MODELS.clear()
    _CONTEXTS.clear()


def resolve_device(settings: Settings, device: str | None) -> str:
    """The torch device to use: the explicit one, else the settings' (auto: cuda when available)."""
    chosen = device or settings.device
    if chosen != "auto":
        return chosen
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def execution_device(settings: Settings, spec_device: str | None, requested: str | None) -> str:
    """The torch device to run a run on: the kind its spec names, with the GPU this process was given.

    Raises:
        InputError: the run is for CUDA and this process has none (it never falls back to the CPU).
    """
    if spec_device is None:  # runs planned before the spec named a device
        return resolve_device(settings, requested)
    if spec_device != "cuda":
        return spec_device
    import torch

    if not torch.cuda.is_available():
        raise InputError("device", "cuda", "the run is for CUDA but this process has no usable CUDA device; "
                                           "run it on a GPU worker (`difftpt-ops worker --gpus all`)")
    for candidate in (requested, settings.device):
        if candidate and candidate.startswith("cuda"):
            return candidate
    return "cuda"


class _TuneRows:
    """Shared by the tuning processors: finished = has a prediction; write = predictions + view scores."""

    run_id: int

    def finished_ids(self, connection: Connection, samples: Sequence[Any]) -> set[int]:
        ids = [sample.id for sample in samples]
        return set(connection.execute(select(Prediction.sample_id).where(
            Prediction.run_id == self.run_id, Prediction.sample_id.in_(ids))).scalars())

    def write(self, connection: Connection, results: list[Any]) -> None:
        insert_many_ignore(connection, Prediction, [prediction for prediction, _ in results])
        insert_many_ignore(connection, ViewScore, [view for _, sample_views in results for view in sample_views])


class NoopProcessor(_TuneRows):
    """Predicts the label: no model, no image read. Only the bookkeeping is measured."""

    def __init__(self, run_id: int, worker: str) -> None:
        self.run_id, self.worker = run_id, worker
        self.delay_s = float(os.environ.get(NOOP_DELAY_ENV) or 0.0)
        self.trace = os.environ.get(NOOP_TRACE_ENV) or None

    def process(self, sample: Any) -> Any:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.trace:
            with open(self.trace, "a", encoding="utf-8") as handle:
                handle.write(f"{self.run_id} {sample.index} {os.getpid()}\n")
        label = sample.label
        prediction = {
            "run_id": self.run_id, "sample_id": sample.id, "sample_index": sample.index, "label": label,
            "pred": label, "top5": [label], "correct": True, "top5_correct": True, "zeroshot_pred": label,
            "zeroshot_correct": True, "entropy_before": None, "entropy_after": None, "confidence_before": None,
            "confidence_after": None, "n_views": 1, "n_kept": 1, "seconds": 0.0, "worker": self.worker,
            "created_at": utcnow(),
        }
        return prediction, ()


class TuneProcessor(_TuneRows):
    """Zero-shot, TPT or DiffTPT on one sample through the engine's tuner."""

    def __init__(self, *, run_id: int, worker: str, tuner: Any, root: Path, seed: int, augmix: bool,
                 views: GeneratedViews | None) -> None:
        self.run_id, self.worker, self.tuner, self.root = run_id, worker, tuner, root
        self.seed, self.augmix, self.views = seed, augmix, views

    features: Any = None  # services.features.FeatureCache: stored view features are read, not encoded

    def process(self, sample: Any) -> Any:
        from difftpt_ops.data.images import load_rgb

        started = time.perf_counter()
        if self.features is not None:
            result = self.features.run_sample(self.tuner, sample, root=self.root, views=self.views, seed=self.seed,
                                              augmix=self.augmix)
            return self._rows(sample, result, time.perf_counter() - started)
        image = load_rgb(self.root / sample.relpath)
        generated = self.views.images_for(sample) if self.views is not None else []
        try:
            result = self.tuner.run(image, generated=generated, seed=self.seed,
                                    sample_key=sample.content_hash or str(sample.id), augmix=self.augmix)
        except InputError as exc:  # about this sample's images, not the run: record it and go on
            raise SampleError(f"sample {sample.index}: {exc}") from exc
        return self._rows(sample, result, time.perf_counter() - started)

    def _rows(self, sample: Any, result: Any, seconds: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        for name in ("entropy_before", "entropy_after", "confidence_before", "confidence_after"):
            value = getattr(result, name, None)
            if value is not None and not math.isfinite(value):
                raise SampleError(f"non-finite {name} ({value}) for sample {sample.index}")
        label, top5 = sample.label, [int(k) for k in result.top5]
        zeroshot = getattr(result, "zeroshot_pred", None)
        prediction = {
            "run_id": self.run_id, "sample_id": sample.id, "sample_index": sample.index, "label": label,
            "pred": int(result.pred), "top5": top5, "correct": int(result.pred) == label,
            "top5_correct": label in top5, "zeroshot_pred": zeroshot,
            "zeroshot_correct": None if zeroshot is None else int(zeroshot) == label,
            "entropy_before": result.entropy_before, "entropy_after": result.entropy_after,
            "confidence_before": result.confidence_before, "confidence_after": result.confidence_after,
            "views_encoded": getattr(result, "views_encoded", 0), "views_read": getattr(result, "views_read", 0),
            "n_views": result.n_views, "n_kept": result.n_kept, "n_generated": _generated_views(result),
            "seconds": seconds,  # wall time of the sample: image, views, features (encoded or read), method
            "worker": self.worker, "created_at": utcnow(),
        }
        views = [{"run_id": self.run_id, "sample_id": sample.id, "view_index": view.index, "kind": view.kind,
                  "cosine": view.cosine, "entropy": view.entropy, "kept": bool(view.kept),
                  "weight": _finite_or_none(getattr(view, "weight", None))}
                 for view in (getattr(result, "views", None) or ())]
        return prediction, views


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _generated_views(result: Any) -> int:
    return sum(1 for view in (getattr(result, "views", None) or ()) if view.kind == "generated")


class GeneratedViews:
    """Reads exactly `count` generated images of a sample (variants 0..count-1): DiffTPT's extra views.

    A sample never gets fewer: if its generation failed the sample fails with that reason, and if its
    images are not there yet the shard waits (NotReadyError) instead of tuning with fewer views.
    """

    def __init__(self, engine: Engine, settings: Settings, config_id: int, count: int) -> None:
        from difftpt_ops.storage.artifacts import ArtifactStore

        self.engine, self.config_id, self.count = engine, config_id, count
        self.store = ArtifactStore(settings.artifact_root)

    def images_for(self, sample: Any) -> list[Any]:
        from difftpt_ops.data.images import load_rgb

        return [load_rgb(path) for path in self.paths_for(sample)]

    def paths_for(self, sample: Any) -> list[Path]:
        from difftpt_ops.services.generation import find_generated_paths
        from difftpt_ops.services.waiting import generation_failure

        if not sample.content_hash:
            raise SampleError(f"sample {sample.index} has no content hash, so no generated images")
        with session_scope(self.engine) as session:
            paths = find_generated_paths(session, self.store, config_id=self.config_id,
                                         source_hash=sample.content_hash, limit=self.count)
            failure = None if len(paths) == self.count else generation_failure(
                session, config_id=self.config_id, source_hash=sample.content_hash)
        if len(paths) == self.count:
            return paths
        if failure is not None:
            reason = failure.strip().splitlines()[-1] if failure.strip() else "no reason recorded"
            raise SampleError(f"sample {sample.index}: its generation failed ({reason})")
        raise NotReadyError(f"sample {sample.index} has {len(paths)} of its {self.count} generated images "
                            f"(generation config {self.config_id})")


class GenerateProcessor:
    """Stable Diffusion variations of one sample; the generation service stores the images itself."""

    def __init__(self, engine: Engine, settings: Settings, *, config_id: int, spec: GenerationSpec, root: Path,
                 batch_size: int, device: str | None, spec_device: str | None = None) -> None:
        from difftpt_ops.services.generation import SampleGenerator
        from difftpt_ops.storage.artifacts import ArtifactStore

        self.engine, self.config_id, self.spec, self.root, self.batch_size = engine, config_id, spec, root, batch_size
        self.store = ArtifactStore(settings.artifact_root)
        from difftpt_ops.models.diffusion import resolve_dtype_name

        self.device = execution_device(settings, spec_device, device)
        self.precision = resolve_dtype_name(spec.dtype, self.device)
        self.delay_s = float(os.environ.get(GENERATE_DELAY_ENV) or 0.0)
        key = ("generator", canonical_json(spec.to_dict()), self.device)
        self.generator = _MODELS.get(key, lambda: SampleGenerator(spec, device=key[2]))

    def finished_ids(self, connection: Connection, samples: Sequence[Any]) -> set[int]:
        hashes = {sample.content_hash for sample in samples if sample.content_hash}
        counts = dict(connection.execute(
            select(GeneratedImage.source_hash, func.count())
            .where(GeneratedImage.generation_config_id == self.config_id, GeneratedImage.source_hash.in_(hashes))
            .group_by(GeneratedImage.source_hash)).all()) if hashes else {}
        return {s.id for s in samples if s.content_hash and counts.get(s.content_hash, 0) >= self.spec.per_sample}

    def process(self, sample: Any) -> Any:
        if self.delay_s:
            time.sleep(self.delay_s)
        if not sample.content_hash:
            raise SampleError(f"sample {sample.index} has no content hash")
        return self.generator.generate_sample(
            self.engine, config_id=self.config_id, spec=self.spec, source_path=self.root / sample.relpath,
            source_hash=sample.content_hash, store=self.store, batch_size=self.batch_size)

    def write(self, connection: Connection, results: list[Any]) -> None:
        """Nothing to write: generate_sample committed the images."""


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

    run_spec = TuneRunSpec.from_dict(run.spec)
    method, model = run_spec.method, run_spec.model
    # Runs planned before the spec named a device carry none: the settings' device applies to them.
    resolved = execution_device(settings, run.spec.get("device") and run_spec.device, device)
    clip = _MODELS.get(("clip", model, resolved), lambda: load_clip(model, resolved))
    class_names = tuple(dataset.class_names)
    checkpoint = method.prompt.coop_checkpoint
    # The run's seed draws the random context (ctx_init none); it is part of the tuner's cache key then.
    init_seed = run_spec.seed if method.prompt.ctx_init is None and not checkpoint else 0

    def build_tuner() -> Any:
        coop_state = read_coop_checkpoint(checkpoint) if checkpoint else None
        return prepare_classifier(clip, list(class_names), method, coop_state=coop_state, init_seed=init_seed)

    tuner = _MODELS.get(("tuner", model, resolved, class_names, canonical_json(method.to_dict()), init_seed),
                        build_tuner)
    n_generated = int(getattr(method, "n_generated", 0))
    views = (GeneratedViews(engine, settings, run.generation_config_id, n_generated)
             if run.generation_config_id is not None and n_generated > 0 else None)
    if n_generated > 0 and views is None:
        raise InputError("--generation", None, f"run {run.id} reads {n_generated} generated images per sample "
                                               "but is bound to no generation config")
    # AugMix defaults to on for the cross-domain sets; a spec that sets `augmix` overrides it in the engine.
    processor = TuneProcessor(run_id=run.id, worker=worker, tuner=tuner, root=Path(dataset.root),
                              seed=run_spec.seed, augmix=is_cross_domain(dataset.format), views=views)
    from difftpt_ops.services.features import feature_cache_for

    processor.features = feature_cache_for(engine, settings, clip, method, model.name)
    processor.device, processor.precision, processor.activation = resolved, clip.precision, clip.activation
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
        from difftpt_ops.services.features import build_features_processor

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
