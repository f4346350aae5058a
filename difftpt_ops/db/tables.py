"""The data model: thin rows, no behaviour. Unique keys make every write idempotent."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from difftpt_ops.core.clock import utcnow
from difftpt_ops.db.base import Base

Timestamp = DateTime(timezone=True)
# SQLite only auto-increments INTEGER primary keys; PostgreSQL gets BIGINT for the big tables.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Dataset(Base):
    """A registered test split: where it lives, its format and class names."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    format: Mapped[str] = mapped_column(String(40))
    root: Mapped[str] = mapped_column(Text)
    class_names: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class DatasetVersion(Base):
    """A fixed list of samples of a dataset: the full split (version 1) or a seeded subset of it."""

    __tablename__ = "dataset_versions"
    __table_args__ = (
        UniqueConstraint("dataset_id", "version"),
        UniqueConstraint("dataset_id", "fingerprint"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_versions.id"))
    subset_size: Mapped[int | None] = mapped_column(Integer)
    subset_seed: Mapped[int | None] = mapped_column(Integer)
    num_samples: Mapped[int] = mapped_column(Integer, default=0)
    num_failed: Mapped[int] = mapped_column(Integer, default=0)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Sample(Base):
    """One test image of a dataset version. `status` is failed when the file cannot be decoded."""

    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("dataset_version_id", "index"),
        Index("ix_samples_version_label", "dataset_version_id", "label"),
        Index("ix_samples_content_hash", "content_hash"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    relpath: Mapped[str] = mapped_column(Text)
    label: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="ok")
    error: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)


class GenerationConfig(Base):
    """A generator spec (model, scheduler, steps, guidance, size, dtype, seed) and its fingerprint."""

    __tablename__ = "generation_configs"

    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class GeneratedImage(Base):
    """One generated variation, keyed by content: source image hash + config + variant index."""

    __tablename__ = "generated_images"
    __table_args__ = (UniqueConstraint("generation_config_id", "source_hash", "variant_index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    generation_config_id: Mapped[int] = mapped_column(ForeignKey("generation_configs.id", ondelete="CASCADE"))
    source_hash: Mapped[str] = mapped_column(String(64))
    variant_index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    artifact_key: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float | None] = mapped_column(Float)
    imported: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Run(Base):
    """A generation or tuning run, identified by its spec fingerprint."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_dataset_version_method", "dataset_version_id", "method"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "tune" or "generate"
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    method: Mapped[str] = mapped_column(String(40))  # zeroshot / tpt / difftpt / noop / generate
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"))
    generation_config_id: Mapped[int | None] = mapped_column(ForeignKey("generation_configs.id"))
    state: Mapped[str] = mapped_column(String(32), default="pending", index=True)
    num_samples: Mapped[int] = mapped_column(Integer, default=0)
    shard_size: Mapped[int] = mapped_column(Integer)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_sync_needed: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Copies of spec fields as plain columns (migration 0003), so SQL compares runs the same way on
    # SQLite and PostgreSQL without JSON functions. `settings`: the method settings that differ from the
    # defaults, "key=value" joined by ", " in key order ("" when none).
    model_name: Mapped[str | None] = mapped_column(Text)
    pretrained: Mapped[str | None] = mapped_column(Text)
    seed: Mapped[int | None] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(16))
    precision: Mapped[str | None] = mapped_column(String(8))
    settings: Mapped[str | None] = mapped_column(Text)
    # What produced the run, from the machine that submitted it: versions, commit, host (provenance.py).
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Shard(Base):
    """A contiguous range of sample indices [start, stop) of one run: the unit of work."""

    __tablename__ = "shards"
    __table_args__ = (
        UniqueConstraint("run_id", "index"),
        Index("ix_shards_run_state", "run_id", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(Integer)
    stop: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    samples_done: Mapped[int] = mapped_column(Integer, default=0)
    samples_failed: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    gpu: Mapped[str | None] = mapped_column(String(40))
    heartbeat_at: Mapped[datetime | None] = mapped_column(Timestamp)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)  # model time spent, summed over attempts
    error: Mapped[str | None] = mapped_column(Text)
    waiting_reason: Mapped[str | None] = mapped_column(Text)  # why a waiting shard is not claimable yet
    # The machine and software of the attempt that claimed it last: device, precision, host, versions.
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # When a lost-message check last sent this queued shard again: one check claims each re-send.
    resent_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Prediction(Base):
    """The result of one sample in one tuning run."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("run_id", "sample_id"),
        Index("ix_predictions_run_label", "run_id", "label"),
        # Covering indexes for `results` and `compare` (migration 0002): index-only scans even when the
        # rows of concurrent runs interleave on disk.
        Index("ix_predictions_run_summary", "run_id", "label", "correct", "top5_correct", "zeroshot_correct",
              "confidence_after", "seconds"),
        Index("ix_predictions_run_sample_correct", "run_id", "sample_id", "correct"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    sample_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    sample_index: Mapped[int] = mapped_column(Integer)
    label: Mapped[int] = mapped_column(Integer)
    pred: Mapped[int] = mapped_column(Integer)
    top5: Mapped[list[int]] = mapped_column(JSON)
    correct: Mapped[bool] = mapped_column(Boolean)
    top5_correct: Mapped[bool] = mapped_column(Boolean)
    zeroshot_pred: Mapped[int | None] = mapped_column(Integer)
    zeroshot_correct: Mapped[bool | None] = mapped_column(Boolean)
    entropy_before: Mapped[float | None] = mapped_column(Float)
    entropy_after: Mapped[float | None] = mapped_column(Float)
    confidence_before: Mapped[float | None] = mapped_column(Float)
    confidence_after: Mapped[float | None] = mapped_column(Float)
    n_views: Mapped[int] = mapped_column(Integer, default=1)
    n_kept: Mapped[int] = mapped_column(Integer, default=1)
    n_generated: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # generated views used
    # Of n_views, how many went through the image encoder and how many were read from the feature store.
    views_encoded: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    views_read: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class ViewScore(Base):
    """Per-view filter scores of one sample in one run: what DiffTPT's filters saw and kept."""

    __tablename__ = "view_scores"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    sample_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("samples.id", ondelete="CASCADE"), primary_key=True)
    view_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # original / conventional / generated
    cosine: Mapped[float | None] = mapped_column(Float)
    entropy: Mapped[float] = mapped_column(Float)
    kept: Mapped[bool] = mapped_column(Boolean)
    weight: Mapped[float | None] = mapped_column(Float)  # a method's own per-view weight (MTA inlierness, ...)


class SampleError(Base):
    """A sample a run could not process (corrupt image, non-finite loss), with the reason."""

    __tablename__ = "sample_errors"
    __table_args__ = (UniqueConstraint("run_id", "sample_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    sample_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("samples.id", ondelete="CASCADE"))
    sample_index: Mapped[int] = mapped_column(Integer)
    error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Sweep(Base):
    """A grid of tuning runs submitted together (`submit tune --sweep k=a,b --seeds 0,1`).

    Identified by the fingerprint of what was asked (dataset version, method, model, fixed overrides,
    grid, seeds), so submitting the same sweep again finds it and makes no new runs.
    """

    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    num_runs: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class SweepRun(Base):
    """A run of a sweep and the grid point it evaluates. A run can belong to several sweeps."""

    __tablename__ = "sweep_runs"
    __table_args__ = (Index("ix_sweep_runs_run_id", "run_id"),)

    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    point: Mapped[dict[str, Any]] = mapped_column(JSON)  # the grid values of this run, seed included


class ViewFeatures(Base):
    """A stored set of image features: one model, one sample, one list of view recipes (storage/features.py).

    The file (safetensors, content-addressed) is written before this row; a reader checks its size and hash.
    """

    __tablename__ = "view_features"
    __table_args__ = (
        UniqueConstraint("model_fingerprint", "sample_hash", "recipe_fingerprint"),
        Index("ix_view_features_model_sample", "model_fingerprint", "sample_hash"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    sample_hash: Mapped[str] = mapped_column(String(64))
    recipe_fingerprint: Mapped[str] = mapped_column(String(64))
    views: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # one recipe per row of the stored tensor
    n_views: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(16))
    artifact_key: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    model_name: Mapped[str | None] = mapped_column(Text)  # for people reading the table; not part of the key
    seconds: Mapped[float | None] = mapped_column(Float)  # encoder time spent making it
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class OnlineCheckpoint(Base):
    """An online run's method state after one of its shards (the chain's shard `shard_index`).

    The safetensors file (content-addressed in the artifact store) is written before this row, and the row
    in the same transaction as that shard's predictions; a reader checks its size and hash.
    """

    __tablename__ = "online_checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "shard_index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    shard_index: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)  # samples of the stream consumed after this shard
    artifact_key: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
