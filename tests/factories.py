"""Rows for tests, made through the ORM: datasets, versions, samples, runs, shards, predictions, view scores.

Each factory flushes (so ids exist) and never commits: the caller's session scope decides.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from difftpt_ops.core.specs import fingerprint_of
from difftpt_ops.db.tables import (
    Dataset,
    DatasetVersion,
    GeneratedImage,
    GenerationConfig,
    Prediction,
    Run,
    Sample,
    SampleError,
    Shard,
    ViewScore,
)

_counter = itertools.count(1)


def _unique(prefix: str) -> str:
    return f"{prefix}{next(_counter)}"


def make_dataset(session: Session, *, n_classes: int = 3, name: str | None = None,
                 root: str = "/data/toy", class_names: Sequence[str] | None = None) -> Dataset:
    """A dataset with `n_classes` classes named class0, class1, ... unless `class_names` is given."""
    names = list(class_names) if class_names is not None else [f"class{i}" for i in range(n_classes)]
    dataset = Dataset(name=name or _unique("toy"), format="imagefolder", root=root, class_names=names)
    session.add(dataset)
    session.flush()
    return dataset


def make_dataset_version(session: Session, n_samples: int = 10, n_classes: int = 3, *,
                         dataset: Dataset | None = None, version: int = 1, **dataset_kw: Any) -> DatasetVersion:
    """A dataset version with `n_samples` samples; sample i has label i % n_classes and path class<l>/img<i>.png."""
    dataset = dataset or make_dataset(session, n_classes=n_classes, **dataset_kw)
    dv = DatasetVersion(dataset_id=dataset.id, version=version, fingerprint=_unique("fp-dv-").ljust(16, "0"),
                        num_samples=n_samples, num_failed=0)
    session.add(dv)
    session.flush()
    labels = len(dataset.class_names)
    session.add_all([
        Sample(dataset_version_id=dv.id, index=i, relpath=f"class{i % labels}/img{i}.png", label=i % labels,
               content_hash=hashlib.sha256(f"{dv.id}:{i}".encode()).hexdigest(), status="ok")
        for i in range(n_samples)
    ])
    session.flush()
    return dv


def samples_of(session: Session, version: DatasetVersion) -> list[Sample]:
    """The samples of a version in index order."""
    return list(session.scalars(select(Sample).where(Sample.dataset_version_id == version.id).order_by(Sample.index)))


def make_generation_config(session: Session, **spec: Any) -> GenerationConfig:
    """A generation config row (the spec is stored as given)."""
    payload = {"model": "tiny", "steps": 2, "per_sample": 4, **spec, "nonce": _unique("g")}
    config = GenerationConfig(fingerprint=fingerprint_of(payload), spec=payload)
    session.add(config)
    session.flush()
    return config


def make_run(session: Session, version: DatasetVersion, *, method: str = "tpt", state: str = "finished",
             spec: dict[str, Any] | None = None, **overrides: Any) -> Run:
    """A tuning run on `version`; num_samples defaults to the version's size."""
    spec = spec or {"kind": "tune", "method": {"method": method, "steps": 1, "lr": 0.005},
                    "model": {"name": "tiny", "pretrained": None}, "seed": 0, "nonce": _unique("r")}
    values: dict[str, Any] = {
        "kind": "tune", "fingerprint": fingerprint_of(spec), "spec": spec, "method": method,
        "dataset_version_id": version.id, "state": state, "num_samples": version.num_samples, "shard_size": 64,
    }
    values.update(overrides)
    run = Run(**values)
    session.add(run)
    session.flush()
    return run


def make_shard(session: Session, run: Run, *, index: int = 0, start: int = 0, stop: int | None = None,
               seconds: float = 10.0, gpu: str | None = None, state: str = "done", **overrides: Any) -> Shard:
    """A shard of `run` with the given model seconds and GPU (None: ran on CPU)."""
    shard = Shard(run_id=run.id, index=index, start=start, stop=run.num_samples if stop is None else stop,
                  state=state, seconds=seconds, gpu=gpu, worker="test-worker", **overrides)
    session.add(shard)
    session.flush()
    return shard


def _at(values: Sequence[Any] | None, i: int, default: Any) -> Any:
    return default if values is None else values[i]


def make_predictions(session: Session, run: Run, correct_mask: Sequence[bool], *,
                     zeroshot_mask: Sequence[bool | None] | None = None,
                     confidences: Sequence[float | None] | None = None,
                     top5_mask: Sequence[bool] | None = None, seconds: float = 0.5,
                     samples: Sequence[Sample] | None = None) -> list[Prediction]:
    """One prediction per entry of `correct_mask`, for the first samples of the run's version.

    A correct sample predicts its label; a wrong one predicts (label + 1) mod n_classes. The zero-shot
    prediction follows `zeroshot_mask` the same way (None entries: no zero-shot prediction).
    """
    samples = list(samples) if samples is not None else session.scalars(
        select(Sample).where(Sample.dataset_version_id == run.dataset_version_id).order_by(Sample.index)
        .limit(len(correct_mask))).all()
    n_classes = _n_classes(session, run)
    rows = []
    for i, (sample, correct) in enumerate(zip(samples, correct_mask, strict=True)):
        zs = _at(zeroshot_mask, i, None)
        pred = sample.label if correct else (sample.label + 1) % n_classes
        rows.append(Prediction(
            run_id=run.id, sample_id=sample.id, sample_index=sample.index, label=sample.label, pred=pred,
            top5=[pred, (pred + 1) % n_classes], correct=bool(correct),
            top5_correct=bool(_at(top5_mask, i, True if correct else False)),
            zeroshot_pred=None if zs is None else (sample.label if zs else (sample.label + 1) % n_classes),
            zeroshot_correct=None if zs is None else bool(zs),
            confidence_before=0.5, confidence_after=_at(confidences, i, 0.9 if correct else 0.6),
            entropy_before=1.0, entropy_after=0.5, n_views=64, n_kept=6, seconds=seconds, worker="test-worker"))
    session.add_all(rows)
    session.flush()
    return rows


def _n_classes(session: Session, run: Run) -> int:
    version = session.get(DatasetVersion, run.dataset_version_id)
    assert version is not None
    dataset = session.get(Dataset, version.dataset_id)
    assert dataset is not None
    return len(dataset.class_names)


def make_sample_errors(session: Session, run: Run, samples: Sequence[Sample], error: str = "corrupt image") -> None:
    """A failure row per sample."""
    session.add_all([SampleError(run_id=run.id, sample_id=s.id, sample_index=s.index, error=error) for s in samples])
    session.flush()


def make_view_scores(session: Session, run: Run, sample: Sample, *, n_conventional: int = 2,
                     n_generated: int = 4, keep_every: int = 2) -> list[ViewScore]:
    """View 0 original, then conventional views, then generated views; every `keep_every`-th generated is kept."""
    rows = [ViewScore(run_id=run.id, sample_id=sample.id, view_index=0, kind="original", cosine=1.0,
                      entropy=0.5, kept=True)]
    for j in range(n_conventional):
        rows.append(ViewScore(run_id=run.id, sample_id=sample.id, view_index=1 + j, kind="conventional",
                              cosine=None, entropy=0.6 + j / 10, kept=j == 0))
    for j in range(n_generated):
        rows.append(ViewScore(run_id=run.id, sample_id=sample.id, view_index=1 + n_conventional + j,
                              kind="generated", cosine=0.9 - j / 20, entropy=0.7, kept=j % keep_every == 0))
    session.add_all(rows)
    session.flush()
    return rows


def make_generated_images(session: Session, config: GenerationConfig, sample: Sample, n: int,
                          keys: Sequence[str] | None = None) -> list[GeneratedImage]:
    """`n` generated-image rows for `sample` under `config`; artifact keys default to `<sha256>.png`."""
    assert sample.content_hash is not None
    rows = []
    for i in range(n):
        digest = hashlib.sha256(f"{config.id}:{sample.content_hash}:{i}".encode()).hexdigest()
        rows.append(GeneratedImage(
            generation_config_id=config.id, source_hash=sample.content_hash, variant_index=i, seed=i,
            artifact_key=keys[i] if keys else f"{digest}.png", content_hash=digest, width=8, height=8))
    session.add_all(rows)
    session.flush()
    return rows
