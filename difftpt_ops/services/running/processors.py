"""What a run does with one sample, and where its models live in this process.

- `NoopProcessor` (method `noop`): predicts the label without model work, for measuring the system's
  own overhead. Test hooks, honoured by noop only: DIFFTPT_OPS_NOOP_DELAY_S sleeps that long per
  sample (to kill a worker mid-run), DIFFTPT_OPS_NOOP_TRACE appends "run_id sample_index pid" per
  processed sample to that file (to prove a finished sample is not redone).
- `TuneProcessor` (every registered episodic method): runs the engine's tuner and maps its SampleResult
  to a Prediction row and ViewScore rows.
- The other kinds' processors live with what they make: `generation.GenerateProcessor` (generate
  runs) and `features.FeaturesProcessor` (features runs); `contexts` picks the one a run needs.

Models load once per process and are reused across shards and runs (`MODELS`): keyed by model spec and
device (the CLIP), by class names and method spec (the tuner built from it), by generation spec (the
diffusion pipeline).
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy import select, update
from sqlalchemy.engine import Connection, Engine

from difftpt_ops.config import Settings
from difftpt_ops.core.clock import utcnow
from difftpt_ops.core.errors import InputError, SampleError, about_one_sample
from difftpt_ops.db.tables import Prediction, Shard, ViewScore
from difftpt_ops.db.writes import insert_many_ignore
from difftpt_ops.services.running.leases import OWNED

if TYPE_CHECKING:
    from difftpt_ops.services.running.generated_views import GeneratedViews

NOOP_DELAY_ENV = "DIFFTPT_OPS_NOOP_DELAY_S"
NOOP_TRACE_ENV = "DIFFTPT_OPS_NOOP_TRACE"
QUEUE_OF_KIND = {"tune": "tune", "generate": "generate", "features": "tune"}  # features: GPU work, like tuning
_MODEL_CACHE_SIZE = 4  # CLIPs and tuners kept per process (a worker usually serves one or two runs)

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


def record_provenance(engine: Engine, claim: Any, context: RunContext) -> None:
    """Store on a claimed shard (or online link) what runs it: device, precision, host and software versions,
    the activation and the weights' hash; refused (InputError) when the run's earlier shards had other weights.
    `claim` is the shard's Claim or ChainClaim (its run_id and OWNED parameters)."""
    from difftpt_ops.provenance import worker_provenance

    facts = {**worker_provenance(context.device, context.precision), **_model_facts(context.processor)}
    with engine.begin() as connection:
        _refuse_other_weights(connection, claim.run_id, facts)
        connection.execute(update(Shard.__table__).where(OWNED).values(provenance=facts), claim.params())


def _model_facts(processor: Any) -> dict[str, Any]:
    """What a run's processor knows of the model it computes with, for a shard's provenance: the activation, the
    sha256 of the loaded weights (`weights`) and of a method's reward model (`reward_weights`, RLCF), and how many
    length groups the class prompts formed (`text_groups`: a device-dependent default that moves float rounding),
    where it has them."""
    facts = {key: getattr(processor, key, None) for key in ("activation", "weights", "reward_weights", "text_groups")}
    return {key: value for key, value in facts.items() if value is not None}


def _refuse_other_weights(connection: Connection, run_id: int, facts: dict[str, Any]) -> None:
    """A run computes with one set of weights. InputError when a shard of the run (this one's earlier attempt
    included) recorded other weights than `facts` names: the model folder or checkpoint file the spec names by
    its path was changed since, and going on would mix two models' predictions in one run."""
    from difftpt_ops.db.tables import Run

    for key in ("weights", "reward_weights"):
        weights = facts.get(key)
        if weights is None:
            continue
        recorded_weights = Shard.provenance[key].as_string()
        # One row at most, found by the database: a run of thousands of shards checks in constant time per shard.
        other = connection.execute(select(Shard.index, recorded_weights).where(
            Shard.run_id == run_id, recorded_weights.is_not(None), recorded_weights != weights)
            .order_by(Shard.index).limit(1)).first()
        if other is None:
            continue
        index, recorded = other
        if key == "weights":
            argument, model = "--model", connection.scalar(select(Run.model_name).where(Run.id == run_id))
        else:
            argument, model = "--set reward_model", _reward_model_of(connection, run_id)
        raise InputError(argument, model, f"its weights changed since run {run_id} started (shard {index} ran "
                         f"with weights sha256 {recorded[:16]}, they are now {weights[:16]}): restore the "
                         "weights the run used, or put the new ones in another folder (another run)")


def _reward_model_of(connection: Connection, run_id: int) -> Any:
    from difftpt_ops.db.tables import Run

    spec = connection.scalar(select(Run.spec).where(Run.id == run_id)) or {}
    return (spec.get("method") or {}).get("reward_model")


class LRU:
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


MODELS = LRU(_MODEL_CACHE_SIZE)


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


@dataclass(frozen=True)
class Prepared:
    """A sample's views made ready for the model by a processor's `prepare` (tuning, features), and the seconds
    that took."""

    views: Any  # features.GatheredViews with the feature store, else the engine's ViewBatch
    seconds: float


class TuneProcessor(_TuneRows):
    """Zero-shot, TPT or DiffTPT on one sample through the engine's tuner."""

    def __init__(self, *, run_id: int, worker: str, tuner: Any, root: Path, seed: int, augmix: bool,
                 views: GeneratedViews | None) -> None:
        self.run_id, self.worker, self.tuner, self.root = run_id, worker, tuner, root
        self.seed, self.augmix, self.views = seed, augmix, views

    features: Any = None  # running.features.FeatureCache: stored view features are read, not encoded
    # Whether the shard loop calls `prepare` for the next sample in a second thread while this one runs
    # (Settings.views_ahead; on for CUDA by default).
    views_ahead: bool = False

    def prepare(self, sample: Any) -> Prepared:
        """The part of `process` that needs no model: the sample's files read, its stored view features read
        and its other views built on the CPU. Safe in another thread than `process`; SampleError, NotReadyError
        and the like are raised here, for the caller to raise where it processes this sample."""
        from difftpt_ops.data.images import load_rgb

        started = time.perf_counter()
        if self.features is not None:
            views = self.features.gather(self.tuner, sample, root=self.root, views=self.views, seed=self.seed,
                                         augmix=self.augmix)
            return Prepared(views, time.perf_counter() - started)
        image = load_rgb(self.root / sample.relpath, sha256=sample.content_hash)
        generated = self.views.images_for(sample) if self.views is not None else []
        with about_one_sample(sample.index):
            views = self.tuner.make_views(image, generated=generated, seed=self.seed,
                                          sample_key=sample.content_hash or str(sample.id), augmix=self.augmix)
        return Prepared(views, time.perf_counter() - started)

    def process(self, sample: Any, prepared: Prepared | None = None) -> Any:
        """The sample's rows; `prepared` is `prepare(sample)`, done beforehand, else done now."""
        prepared = prepared or self.prepare(sample)
        started = time.perf_counter()
        if self.features is not None:
            result = self.features.run_sample(self.tuner, sample, root=self.root, views=self.views, seed=self.seed,
                                              augmix=self.augmix, gathered=prepared.views)
        else:
            with about_one_sample(sample.index):  # as the engine's `run` (views and method) always was
                result = self.tuner.run_views(prepared.views)
        # The sample's own work: reading and building (perhaps overlapped with the previous sample) plus the model.
        return self._rows(sample, result, prepared.seconds + time.perf_counter() - started)

    def _rows(self, sample: Any, result: Any, seconds: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        _require_finite({name: getattr(result, name, None) for name in ("entropy_before", "entropy_after",
                                                                        "confidence_before", "confidence_after")},
                        sample.index)
        label = sample.label
        zeroshot = getattr(result, "zeroshot_pred", None)
        prediction = {
            "run_id": self.run_id, "sample_id": sample.id, "sample_index": sample.index, "label": label,
            **_decided(label, result.pred, result.top5), "zeroshot_pred": zeroshot,
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

    def revise(self, row: Any, logits: Any) -> Any:
        """`row` with the sample's final prediction `logits` (n_classes,), for a sample whose step predicted it
        provisionally (an online method that predicts in blocks: OGA's batches). Only what the prediction
        decides changes: class, top 5, their correctness, the final entropy and confidence.

        Raises:
            SampleError: the final prediction is not finite.
        """
        from difftpt_ops.tta.engine import prediction_summary

        prediction, views = row
        final = prediction_summary(logits)
        _require_finite({"entropy_after": final.entropy, "confidence_after": final.confidence},
                        prediction["sample_index"])
        return {**prediction, **_decided(prediction["label"], final.pred, final.top5),
                "entropy_after": final.entropy, "confidence_after": final.confidence}, views


def _require_finite(values: dict[str, float | None], sample_index: int) -> None:
    """SampleError naming the first of `values` (a result's entropies and confidences) that is not finite."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise SampleError(f"non-finite {name} ({value}) for sample {sample_index}")


def _decided(label: int, pred: int, top5: Any) -> dict[str, Any]:
    """A prediction row's class, top 5 and their correctness against `label`."""
    top5 = [int(k) for k in top5]
    return {"pred": int(pred), "top5": top5, "correct": int(pred) == label, "top5_correct": label in top5}


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _generated_views(result: Any) -> int:
    return sum(1 for view in (getattr(result, "views", None) or ()) if view.kind == "generated")
