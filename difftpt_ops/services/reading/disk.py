"""Disk a run's stored files take: the generated images it made or reads, and the view features stored for
its samples and model (image sizes read from the store, feature sizes from their rows)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from difftpt_ops.config import Settings
from difftpt_ops.core.run_specs import stream_order
from difftpt_ops.db.tables import DatasetVersion, GeneratedImage, Run, Sample, ViewFeatures
from difftpt_ops.storage.artifacts import ArtifactStore


def run_disk_usage(engine: Engine, settings: Settings, run_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Per run: images and image_bytes of the generated images of its samples, features and feature_bytes.

    A generation run counts the images it made; a DiffTPT run the images it reads; other runs none.
    Features are the stored view features of the run's samples under the run's model name, and under its reward
    model's (RLCF: the folder the spec names, whose features of the kept views are stored too). Files shared
    by runs count for each of them; image files missing from the store count as 0 bytes.
    """
    store = ArtifactStore(settings.artifact_root)
    usage: dict[int, dict[str, Any]] = {}
    with Session(engine) as session:
        for run in session.scalars(select(Run).where(Run.id.in_(run_ids))):
            keys = _image_keys(session, run)
            features, feature_bytes = _features(session, run)
            usage[run.id] = {"images": len(keys), "image_bytes": sum(_size(store, key) for key in keys),
                             "features": features, "feature_bytes": feature_bytes}
    return usage


def _image_keys(session: Session, run: Run) -> list[str]:
    if run.generation_config_id is None:
        return []
    sources = select(Sample.content_hash).where(Sample.dataset_version_id == run.dataset_version_id,
                                                Sample.index < run.num_samples)
    return list(session.scalars(select(GeneratedImage.artifact_key).where(
        GeneratedImage.generation_config_id == run.generation_config_id,
        GeneratedImage.source_hash.in_(sources))))


def _features(session: Session, run: Run) -> tuple[int, int]:
    if run.model_name is None:
        return 0, 0
    reward = ((run.spec or {}).get("method") or {}).get("reward_model")
    names = [run.model_name] + ([reward] if reward and reward != run.model_name else [])
    totals = select(func.count(ViewFeatures.id), func.coalesce(func.sum(ViewFeatures.size_bytes), 0))
    count, size = session.execute(totals.where(ViewFeatures.model_name.in_(names),
                                               ViewFeatures.sample_hash.in_(_run_samples(session, run)))).one()
    return int(count), int(size)


def _run_samples(session: Session, run: Run) -> Any:
    """The content hashes of the samples in a run's scope: the first num_samples by index, or for an online run
    (its spec has an `order_seed`) the first num_samples positions of its seeded stream (`--limit N`)."""
    in_version = Sample.dataset_version_id == run.dataset_version_id
    order_seed = ((run.spec or {}).get("method") or {}).get("order_seed")
    if isinstance(order_seed, int):
        size = session.scalar(select(DatasetVersion.num_samples).where(DatasetVersion.id == run.dataset_version_id))
        if size is not None and run.num_samples < size:
            indices = stream_order(int(size), order_seed)[:run.num_samples]
            # literal values: a --limit of tens of thousands would pass SQLite's limit on bound parameters
            positions = bindparam("positions", indices, expanding=True, literal_execute=True)
            return select(Sample.content_hash).where(in_version, Sample.index.in_(positions))
    return select(Sample.content_hash).where(in_version, Sample.index < run.num_samples)


def _size(store: ArtifactStore, key: str) -> int:
    try:
        return store.path(key).stat().st_size
    except (OSError, ValueError):  # deleted by hand, or a key the store does not accept
        return 0
